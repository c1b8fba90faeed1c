"""The /predict request contract: parse and validate a body, answer with the JSON envelope.

Server-agnostic: the TorchServe handler (and any other server) hands bodies in and sends the
(status, payload) pairs back out.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

from serving.admission import Ledger, clamp_arrival, explanation_kind
from skinlesion.explain import DeadlinePassed, explanation_payload
from skinlesion.image import ImageError, decode_image
from skinlesion.model import CLASS_NAMES
from skinlesion.options import COVERAGE_LEVELS, DEFAULT_COVERAGE, METHODS, PRECISIONS
from skinlesion.predictor import Predictor

log = logging.getLogger(__name__)

# KServe v1 "instances" per request, and how many of them may ask for an explanation: a list of tiny images
# would otherwise become gigabytes of model input, or hold a worker for many explanations in a row.
MAX_INSTANCES = 16
MAX_EXPLANATIONS_PER_REQUEST = 1
# The body nginx sends for GET /model (serving/nginx.conf): answered with the model card, not a prediction.
MODEL_CARD_REQUEST = {"model_card": True}
DATA_URL_PREFIX = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")
WHITESPACE = re.compile(r"\s+")


class RequestError(ValueError):
    """A client mistake, answered with `status` and the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PredictRequest:
    image: bytes
    explain: bool = False
    precision: str = "Medium"
    method: str = "lime"
    coverage: float = DEFAULT_COVERAGE
    # The class to explain, one of CLASS_NAMES; None: the predicted one.
    explain_class: str | None = None


@dataclass(frozen=True)
class Arrival:
    """When, as what and from whom a request reached the public door (nginx's $request_id, $msec and client), and
    whether nginx asks for its explanation's admission: it sends an explanation to the batching pool again once
    the client's explanation rate let it through (serving/nginx.conf @explain)."""

    request_id: str
    seconds: float  # time.time() at arrival
    client: str = ""
    admission: bool = False


def failure(message: str) -> dict:
    return {"success": False, "error": message}


def busy(message: str, retry_after: int) -> tuple[int, dict]:
    """503 with the seconds after which to retry: servers send it as the Retry-After header too."""
    return 503, {**failure(message), "retry_after": retry_after}


def past_deadline(message: str, deadline: float) -> tuple[int, dict]:
    """An explanation given up at its deadline: the queue it waited in is long, so retry after a quarter of it."""
    return busy(f"{message}; retry later, or use method gradient", max(1, round(deadline / 4)))


def parse_body(body: Any) -> dict:
    """The request body as a JSON object, whether the server already parsed it or not."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(bytes(body).decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError("the body is not UTF-8 text; send a JSON object") from None
        except json.JSONDecodeError as exc:
            raise RequestError(f"the body is not valid JSON ({exc.msg} at position {exc.pos})") from None
        except ValueError as exc:
            # Integers over Python's 4,300-digit limit raise a plain ValueError, not a JSONDecodeError.
            raise RequestError(f"the body is not usable JSON ({str(exc).split(':')[0]})") from None
        except RecursionError:
            raise RequestError("the body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object like {{\"image\": \"<base64>\"}}, not {json_type(body)}")
    return body


def parse_request(body: Any) -> PredictRequest:
    """Validate a /predict body; every client mistake raises RequestError with a message to act on."""
    fields = parse_body(body)
    image = fields.get("image")
    if image is None:
        raise RequestError("'image' is required: the image file's bytes as a base64 string")
    if not isinstance(image, str):
        raise RequestError(f"'image' must be a base64 string, not {json_type(image)}")
    prefix = DATA_URL_PREFIX.match(image)
    data = decode_base64(image[prefix.end():] if prefix else image)
    explain = fields.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError(f"'explain' must be true or false, not {json_type(explain)}")
    precision = fields.get("precision", "Medium")
    if not isinstance(precision, str) or precision.capitalize() not in PRECISIONS:
        raise RequestError(f"'precision' must be one of {', '.join(PRECISIONS)}, not {json.dumps(precision)[:40]}")
    method = fields.get("method", "lime")
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise RequestError(f"'method' must be one of {', '.join(METHODS)}, not {json.dumps(method)[:40]}")
    coverage = fields.get("coverage", DEFAULT_COVERAGE)
    if isinstance(coverage, bool) or coverage not in COVERAGE_LEVELS:
        raise RequestError(f"'coverage' (of the prediction set) must be one of {', '.join(map(str, COVERAGE_LEVELS))}, "
                           f"not {json.dumps(coverage)[:40]}")
    return PredictRequest(data, explain, precision.capitalize(), method.lower(), float(coverage),
                          explain_class=parse_explain_class(fields))


def parse_explain_class(fields: dict) -> str | None:
    """The class name asked for, as CLASS_NAMES spells it (matched case-insensitively); None when not asked."""
    if "explain_class" not in fields:
        return None
    asked = fields["explain_class"]
    names = {name.lower(): name for name in CLASS_NAMES}
    if not isinstance(asked, str) or asked.lower() not in names:
        raise RequestError(f"'explain_class' must be one of the classes {', '.join(CLASS_NAMES)}, "
                           f"not {json.dumps(asked)[:40]}")
    return names[asked.lower()]


def decode_base64(text: str) -> bytes:
    """Strict base64, also line-wrapped (`base64` without -w0); the whitespace scan only runs when the
    plain decode fails: it ran over every photo, 1.8% of a worker's time (docs/performance.md)."""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error (bad characters, padding) is one; line-wrapped text ends here too
        pass
    try:
        return base64.b64decode(WHITESPACE.sub("", text), validate=True)
    except ValueError:
        raise RequestError("'image' is not valid base64") from None


def json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def respond_instances(predictor: Predictor, instances: Any) -> tuple[int, list[dict]]:
    """KServe v1: one request's "instances", each a /predict body, answered in order in one response.

    Each answer carries its own success or error; the one HTTP status is 200 when any instance succeeded,
    else the worst failure's (a lone instance gets exactly its /predict status). Not the worst status
    always: TorchServe closes the connection after a non-200 answer, and a large body (explanations) is
    cut short by the reset.
    """
    if not isinstance(instances, list) or not instances:
        return 400, [failure('send {"instances": [{"image": "<base64>"}, ...]}: a non-empty list of /predict bodies')]
    if len(instances) > MAX_INSTANCES:
        return 400, [failure(f"{len(instances)} instances in one request; at most {MAX_INSTANCES} are accepted: "
                             "split them over several requests")]
    explaining = sum(isinstance(i, dict) and i.get("explain") is True for i in instances)
    if explaining > MAX_EXPLANATIONS_PER_REQUEST:
        return 400, [failure(f"{explaining} instances ask for an explanation; at most {MAX_EXPLANATIONS_PER_REQUEST} "
                             "per request: send the others in their own requests")]
    answers = respond(predictor, instances)
    statuses = [status for status, _ in answers]
    return 200 if 200 in statuses else max(statuses), [payload for _, payload in answers]


def respond(predictor: Predictor, bodies: list[Any], timings: dict[str, float] | None = None,
            explanations_at: str | None = None, arrivals: list[Arrival] | None = None, ledger: Ledger | None = None,
            deadline: float | None = None) -> list[tuple[int, dict]]:
    """(HTTP status, JSON payload) for each body; valid images are classified as one batch.

    `timings` (if given) gets the batch's milliseconds spent decoding, preprocessing and in the model.
    `explanations_at` (a path) is where a server that batches plain predictions sends explanation
    requests: they are answered 307 (repeat this request there) so that none holds a batch back; on the pass
    where nginx asks for admission, once the `ledger` (if given) admits them against the explaining workers'
    deadline and the client's share, or 503 with the expected wait.
    `deadline` (seconds from arrival, for a server that explains) is when an explanation is given up: one
    picked up later is answered 503 without computing it, and LIME stops between sample batches past it.
    `arrivals` (one per body) say when each request arrived and as what; without them, now.
    """
    start = time.perf_counter()
    handling_since = time.monotonic()
    arrivals = arrivals or [Arrival("", time.time()) for _ in bodies]
    answers: list[tuple[int, dict] | None] = [None] * len(bodies)
    accepted: list[tuple[int, PredictRequest, Image.Image]] = []
    for i, body in enumerate(bodies):
        try:
            fields = parse_body(body)
            if fields == MODEL_CARD_REQUEST:
                answers[i] = (200, {"success": True, **predictor.model_card()})
                continue
            request = parse_request(fields)
            if request.explain and explanations_at:
                kind = explanation_kind(request.method, request.precision)
                admitting = ledger is not None and arrivals[i].request_id and arrivals[i].admission
                refusal = (ledger.admit(arrivals[i].request_id, kind, arrivals[i].seconds, client=arrivals[i].client,
                                        pool=predictor.arch) if admitting else None)
                answers[i] = (busy(refusal.message, refusal.retry_after) if refusal else
                              (307, failure(f"explanations are answered at {explanations_at}: send this request there")))
                continue
            accepted.append((i, request, decode_image(request.image)))
        except (RequestError, ImageError) as exc:
            answers[i] = (getattr(exc, "status", 400), failure(str(exc)))
            release(ledger, explanations_at, arrivals[i])
    if timings is not None:
        timings["decode"] = (time.perf_counter() - start) * 1000
    if not accepted:
        return answers
    try:
        results = predictor.predict([image for _, _, image in accepted], timings,
                                    [request.coverage for _, request, _ in accepted])
    except Exception:
        log.exception("prediction failed")
        for i, _, _ in accepted:
            answers[i] = (500, failure("the model failed on this image; the error is in the server log"))
            release(ledger, explanations_at, arrivals[i])
        return answers
    for (i, request, image), result in zip(accepted, results, strict=True):
        answers[i] = (200, {"success": True, **result})
        if request.explain:
            answers[i] = add_explanation(predictor, image, request, answers[i], arrivals[i], ledger, deadline, handling_since)
    return answers


def release(ledger: Ledger | None, explanations_at: str | None, arrival: Arrival) -> None:
    """On a server that explains, a request answered with an error before its explanation started (its image did
    not decode, say) stops counting in the ledger now, not at its deadline."""
    if ledger and not explanations_at and arrival.request_id:
        ledger.finish(arrival.request_id)


def add_explanation(predictor: Predictor, image: Image.Image, request: PredictRequest, answer: tuple[int, dict],
                    arrival: Arrival, ledger: Ledger | None, deadline: float | None, handling_since: float) -> tuple[int, dict]:
    """The prediction's answer with its explanation added, or the reason there is none. The ledger learns the
    seconds since `handling_since` (time.monotonic()), when this worker took the request: what the admission must
    expect of it."""
    kind = explanation_kind(request.method, request.precision)
    # The arrival the admitting worker recorded is the request's first; nginx's header on the replay is later.
    arrived = (ledger.start(arrival.request_id) if ledger and arrival.request_id else None) or arrival.seconds
    started = time.time()
    arrived = clamp_arrival(arrived, started)
    until = arrived + deadline if deadline is not None else None
    computing_since = time.monotonic()
    computed = None
    try:
        if until is not None and started > until:
            log.info("explanation %s (%s) not computed: it waited %.2f s", arrival.request_id or "-", kind,
                     started - arrived)
            return past_deadline(f"this explanation waited {started - arrived:.0f} s, past the {deadline:g} s an "
                                 "explanation may take, and was not computed", deadline)
        label = CLASS_NAMES.index(request.explain_class or answer[1]["prediction"])
        log.info("explaining %s (%s)", arrival.request_id or "-", kind)
        # The check starts from the probability the answer states, not one recomputed in another batch.
        answer[1].update(explanation_payload(predictor, image, label, request.method, request.precision, until=until,
                                             stated=answer[1]["probabilities"][CLASS_NAMES[label]]))
        log.info("explained %s (%s) in %.2f s", arrival.request_id or "-", kind, time.monotonic() - computing_since)
        computed = time.monotonic() - handling_since
        return answer
    except DeadlinePassed:
        log.warning("explanation %s (%s) stopped at its deadline after %.2f s", arrival.request_id or "-", kind,
                    time.monotonic() - computing_since)
        return past_deadline(f"this explanation did not finish within the {deadline:g} s an explanation may take (it "
                             f"waited {started - arrived:.0f} s)", deadline)
    except Exception:
        log.exception("explanation failed")
        return 500, failure("the explanation failed on this image; the error is in the server log")
    finally:
        if ledger and arrival.request_id:
            ledger.finish(arrival.request_id, kind, computed)
