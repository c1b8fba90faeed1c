"""Command-line client for the skin-lesion service: classify images through POST /predict.

    python client.py [--explain] [--precision Low|Medium|High] [--method lime|gradcam] [--explain-class NAME] [--out DIR]
                     [--json] [--workers N] [--url URL] image|directory|glob [...]
    python client.py --use-model resnet18|resnet34 [--management-url URL]
    python client.py --model-card [--url URL]

Exit status: 0 when every image succeeded, 1 when any failed, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import base64
import glob
import json
import math
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from tqdm import tqdm

from serving.settings import DEFAULT_MANAGEMENT_URL, DEFAULT_PREDICT_URL, TORCHSERVE_MODELS
from skinlesion.options import (
    ARCHITECTURE_NAMES,
    COVERAGE_LEVELS,
    DEFAULT_COVERAGE,
    IMAGE_SUFFIXES,
    METHODS,
    PRECISIONS,
)

# Seconds to wait for an answer. An explanation is answered within its deadline (120 s, or refused at once
# when it cannot make it), and nginx gives up after 200 s: the client waits a little longer than nginx, so the
# server's own answer always arrives first.
TIMEOUTS = {"plain": 30.0, "explain": 210.0}
# 502/503: TorchServe down or restarting. 500/507: what TorchServe answers for the request a crashed worker
# held ("Worker died.", 507 when it has seen exit status 137, else 500); nginx's 500 envelope says "try
# again". Predictions are idempotent, so a retry is safe; a request the model itself fails on (also 500)
# is tried 4 times in all, a bounded cost.
RETRY_STATUSES = (500, 502, 503, 507)
BACKOFF = 0.5  # seconds before the first retry, doubled for each next one: 0.5, 1, 2
# A 503 with Retry-After ("explanations are busy") is retried after that many seconds, up to this long in all.
# A wait under a second (the server never asks for less) counts as one, so at most 300 busy retries are sent.
MAX_BUSY_WAIT = 300.0
MIN_BUSY_WAIT = 1.0
# The largest image the API takes: 15 MiB is 20 MiB in base64, under nginx's 21 MiB body limit (serving/nginx.conf;
# .streamlit/config.toml's maxUploadSize repeats it for the page, and a test checks the three agree).
MAX_UPLOAD_MB = 15


class ClientError(Exception):
    """The service could not be asked or did not answer usably; the message is one line for the user."""


def encode_image(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def reason(exc: BaseException) -> str:
    """'connection refused' rather than urllib3's nested repr."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]>]+)", str(exc))
    return match.group(1).strip().lower() if match else type(exc).__name__


def post_predict(url: str, image: bytes, explain: bool = False, precision: str = "Medium", method: str = "lime",
                 timeout: float | None = None, retries: int = 3, max_busy_wait: float = MAX_BUSY_WAIT,
                 on_busy: Callable[[float, str], None] | None = None, coverage: float = DEFAULT_COVERAGE,
                 explain_class: str | None = None) -> dict:
    """POST one image; returns the JSON envelope, success or failure. `explain_class` (a class name) is the class
    to explain, when not the predicted one. 500/502/503/507 answers and connection
    errors are retried `retries` times with exponential backoff; a 503 with Retry-After (busy) is retried after
    the seconds it names while the waits add up to at most `max_busy_wait`, calling on_busy(seconds, message)
    before each; other trouble raises ClientError."""
    if timeout is None:
        timeout = TIMEOUTS["explain"] if explain else TIMEOUTS["plain"]
    body = {"image": encode_image(image), "explain": explain, "precision": precision, "method": method,
            "coverage": coverage}
    if explain_class:
        body["explain_class"] = explain_class
    attempt, busy_waited = 0, 0.0
    while True:
        try:
            response = requests.post(url, json=body, timeout=timeout, allow_redirects=False)
        except requests.ConnectionError as exc:  # refused, reset, DNS, connect timeout
            if attempt == retries:
                raise ClientError(f"the service at {url} is unreachable ({reason(exc)}; tried {retries + 1} times)") from None
        except requests.Timeout:
            raise ClientError(f"the service at {url} did not answer within {timeout:g} s") from None
        except requests.RequestException as exc:
            raise ClientError(f"cannot send the request to {url}: {exc}") from None
        else:
            wait = retry_after(response)
            if wait is not None:
                answer = read_envelope(url, response)
                if busy_waited + wait > max_busy_wait:
                    answer["error"] = f"{answer.get('error')} (gave up after waiting {busy_waited:.0f} s in all)"
                    return answer
                if on_busy:
                    on_busy(wait, answer.get("error", "busy"))
                time.sleep(wait)
                busy_waited += wait
                continue
            if response.status_code not in RETRY_STATUSES or attempt == retries:
                return read_envelope(url, response)
        time.sleep(BACKOFF * 2**attempt)
        attempt += 1


def retry_after(response: requests.Response) -> float | None:
    """The seconds a 503 says to wait before trying again (Retry-After in seconds, at least MIN_BUSY_WAIT), if
    it says so with a finite number; otherwise it is a plain 503, retried with backoff."""
    if response.status_code != 503:
        return None
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return max(MIN_BUSY_WAIT, seconds) if math.isfinite(seconds) else None


def read_envelope(url: str, response: requests.Response) -> dict:
    """The answer's JSON object; anything without a "success" field becomes a failure envelope. A redirect is
    not followed (the image would go wherever it points): it is a failure that names where it pointed."""
    answered = f"the service at {url} answered HTTP {response.status_code}"
    if response.is_redirect:
        return {"success": False, "error": f"{answered}, a redirect to {response.headers.get('Location', '?')}, which "
                "is not followed: use the service's own URL"}
    try:
        payload = response.json()
    except ValueError:
        raise ClientError(f"{answered} with a non-JSON body: {' '.join(response.text.split())[:80]!r}") from None
    if not isinstance(payload, dict):
        raise ClientError(f"{answered} with JSON that is not an object")
    if "success" not in payload:  # e.g. TorchServe's own error format, when pointed at it directly
        message = payload.get("message") or payload.get("error") or json.dumps(payload)[:200]
        payload = {"success": False, "error": f"HTTP {response.status_code}: {message}"}
    return payload


class AnswerCache:
    """The latest `size` successful answers by key, without the explanation's pixel array (`explain`, the
    largest part of an answer; the PNG in `explanation` shows the same): what the page keeps per session."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.answers: OrderedDict[Hashable, dict] = OrderedDict()

    def get(self, key: Hashable) -> dict | None:
        if key in self.answers:
            self.answers.move_to_end(key)
        return self.answers.get(key)

    def put(self, key: Hashable, answer: dict) -> dict:
        answer = {k: v for k, v in answer.items() if k != "explain"}
        if answer.get("success"):
            self.answers[key] = answer
            self.answers.move_to_end(key)
            while len(self.answers) > self.size:
                self.answers.popitem(last=False)
        return answer


def get_model_card(predict_url: str, timeout: float = 10.0) -> dict:
    """GET /model beside the /predict URL: the served default version's card (a success envelope)."""
    url = predict_url.rsplit("/predict", 1)[0] + "/model"
    try:
        response = requests.get(url, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise ClientError(f"cannot read the model card at {url} ({reason(exc)})") from None
    return read_envelope(url, response)


def set_default(management_url: str, version: str) -> dict:
    """Make `version` the default of every TorchServe model (plain predictions and explanations switch
    together) through the management API; returns TorchServe's answer per model."""
    answers = {}
    for model in TORCHSERVE_MODELS:
        response = requests.put(f"{management_url}/models/{model}/{version}/set-default", timeout=10)
        answers[model] = response.json() if response.content else None
        if response.status_code != 200:
            raise RuntimeError(f"set-default {model} {version} failed ({response.status_code}): {answers[model]}")
    return answers


def use_model(management_url: str, version: str) -> str:
    """Make `version` the default of the "skin" models in TorchServe; returns the default it now reports."""
    management_url = management_url.rstrip("/")
    try:
        set_default(management_url, version)
        described = requests.get(f"{management_url}/models/skin", timeout=10)
    except (requests.RequestException, ValueError, RuntimeError) as exc:
        detail = f"unreachable ({reason(exc)})" if isinstance(exc, requests.ConnectionError) else str(exc)
        raise ClientError(f"cannot switch the model at {management_url}: {detail}") from None
    versions = described.json() if described.status_code == 200 else []
    return versions[0].get("modelVersion", version) if isinstance(versions, list) and versions else version


def expand_inputs(args: list[str]) -> tuple[list[Path], list[str]]:
    """Image paths for files, directories (their images) and globs; plus a message for each that found nothing."""
    paths: list[Path] = []
    problems: list[str] = []
    for arg in args:
        matches = sorted(glob.glob(arg)) if any(c in arg for c in "*?[") and not os.path.exists(arg) else [arg]
        if not matches:
            problems.append(f"{arg}: no files match this pattern")
        for match in map(Path, matches):
            if match.is_dir():
                images = sorted(p for p in match.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                if not images:
                    problems.append(f"{match}: the directory holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
                paths += images
            else:
                paths.append(match)  # missing or unreadable files fail when read, with the reason
    return list(dict.fromkeys(paths)), problems  # each file once, in the order given


def explanation_names(paths: list[Path]) -> dict[Path, str]:
    """A distinct explanation file name per input: <stem>_explain.png, with the parent folder's name in front
    where stems repeat (a/mole.jpg, b/mole.jpg), and _2, _3, ... after a name that is still taken. Names are
    compared case-folded, as a case-insensitive file system would."""
    stems = [path.stem.casefold() for path in paths]
    wanted = [f"{path.parent.name}_{path.stem}" if path.parent.name and stems.count(path.stem.casefold()) > 1
              else path.stem for path in paths]
    taken: set[str] = set()
    names = {}
    for path, name in zip(paths, wanted, strict=True):
        unique, number = name, 1
        while unique.casefold() in taken:
            number += 1
            unique = f"{name}_{number}"
        taken.add(unique.casefold())
        names[path] = f"{unique}_explain.png"
    return names


def classify_file(path: Path, args: argparse.Namespace, out_name: str) -> dict:
    """The envelope for one file, with "file" added; reading and client errors become failure envelopes."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {"file": str(path), "success": False, "error": "no such file"}
    except OSError as exc:
        return {"file": str(path), "success": False, "error": f"cannot read the file ({exc.strerror or exc})"}
    try:
        result = post_predict(args.url, data, args.explain, args.precision, args.method,
                              on_busy=lambda seconds, message: print(f"{path}: {message}; retrying in {seconds:.0f} s",
                                                                     file=sys.stderr),
                              coverage=args.coverage, explain_class=args.explain_class)
    except ClientError as exc:
        return {"file": str(path), "success": False, "error": str(exc)}
    result = {"file": str(path), **result}
    result.pop("explain", None)  # the HxWx3 pixel array: too big to print; --out saves the PNG instead
    explanation = result.get("explanation")
    if isinstance(explanation, dict) and "image_png" in explanation:
        pngs = {out_name: explanation.pop("image_png"),
                out_name.removesuffix("_explain.png") + "_attribution.png": explanation.pop("attribution_png", None)}
        if args.out and pngs[out_name]:
            saved = []
            for name, png in pngs.items():
                target = args.out / name
                try:
                    if png:
                        target.write_bytes(base64.b64decode(png))
                        saved.append(str(target))
                except (OSError, ValueError) as exc:
                    return {**result, "success": False, "error": f"cannot save the explanation to {target}: {exc}"}
            result["saved"] = saved
    return result


def check_line(explanation: dict) -> str | None:
    """An explanation's self-check in words ("hiding the highlighted area drops Melanoma from 0.71 to 0.22; a random
    area of the same size: 0.69"); None when the answer has none."""
    check = explanation.get("check")
    if not isinstance(check, dict):
        return None
    before, after = f"{check['probability']:.2f}", f"{check['marked_hidden']:.2f}"
    change = (f"leaves {explanation['label']} at {before}" if before == after else
              f"{'drops' if after < before else 'raises'} {explanation['label']} from {before} to {after}")
    return f"hiding the highlighted area {change}; a random area of the same size: {check['random_hidden']:.2f}"


def malignancy(result: dict) -> str:
    probability = result.get("malignant_probability")
    if probability is None:
        return "?"
    return f"{probability:.2f}" + (" ALERT" if result.get("malignancy_alert") else "")


def prediction_set(result: dict) -> str:
    """The classes that hold the true one at the answer's coverage, as "90%: Melanoma, Melanocytic nevi"."""
    if not result.get("prediction_set"):
        return "-"
    return f"{result['set_coverage']:.0%}: " + ", ".join(result["prediction_set"])


def print_table(results: list[dict]) -> None:
    rows = [("file", "prediction", "probability", "top-3", "prediction set", "malignant", "model", "warnings")]
    for r in results:
        top = sorted(r.get("probabilities", {}).items(), key=lambda item: -item[1])[:3]
        rows.append((r["file"], r.get("prediction", "?"), f"{r.get('probability', 0):.3f}",
                     ", ".join(f"{name} {p:.2f}" for name, p in top), prediction_set(r), malignancy(r), r.get("model", "?"),
                     ", ".join(w.get("code", "?") for w in r.get("warnings", [])) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for r in results:
        for warning in r.get("warnings", []):
            print(f"{r['file']}: warning: {warning.get('message', warning.get('code'))}")
        if isinstance(r.get("explanation"), dict) and (line := check_line(r["explanation"])):
            print(f"{r['file']}: {line}")
        if "saved" in r:
            print(f"{r['file']}: explanation saved to {' and '.join(r['saved'])}")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="*", help="image files, directories of images, or glob patterns")
    parser.add_argument("--explain", action="store_true", help="also ask for an explanation of each prediction")
    parser.add_argument("--precision", choices=PRECISIONS, default="Medium", help="explanation precision (slower when higher)")
    parser.add_argument("--method", choices=METHODS, default="lime", help="explanation method")
    parser.add_argument("--explain-class", metavar="NAME",
                        help="the class to explain, e.g. Melanoma (default: the predicted one)")
    parser.add_argument("--coverage", type=float, choices=COVERAGE_LEVELS, default=DEFAULT_COVERAGE,
                        help="coverage of the prediction set: the share of lesions like the validation ones whose true "
                        f"class it holds (default {DEFAULT_COVERAGE})")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="directory for the explanation images (<image-stem>_explain.png, <image-stem>_attribution.png)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image and line")
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N", help="concurrent requests (default 1)")
    parser.add_argument("--url", default=os.environ.get("SKIN_API_URL", DEFAULT_PREDICT_URL),
                        help="the /predict URL ($SKIN_API_URL)")
    parser.add_argument("--use-model", choices=ARCHITECTURE_NAMES, help="switch the service's default model version first")
    parser.add_argument("--model-card", action="store_true",
                        help="print the served model's card (GET /model: metrics, calibration, thresholds) as JSON")
    parser.add_argument("--management-url", default=os.environ.get("SKIN_MANAGEMENT_URL", DEFAULT_MANAGEMENT_URL),
                        help="TorchServe's management API ($SKIN_MANAGEMENT_URL)")
    args = parser.parse_args(argv)
    if not args.images and not args.use_model and not args.model_card:
        parser.error("give at least one image, --use-model or --model-card")
    if args.out and not args.explain:
        parser.error("--out saves explanations: add --explain")
    if args.explain_class and not args.explain:
        parser.error("--explain-class chooses what to explain: add --explain")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.use_model:
        try:
            current = use_model(args.management_url, args.use_model)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"default model: {current}", file=sys.stderr if args.images else sys.stdout)
        if not args.images and not args.model_card:
            return 0
    if args.model_card:
        try:
            print(json.dumps(get_model_card(args.url), indent=2))
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if not args.images:
            return 0
    paths, problems = expand_inputs(args.images)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        names = explanation_names(paths)
        answers = pool.map(lambda path: classify_file(path, args, names[path]), paths)
        for result in tqdm(answers, total=len(paths), unit="image", file=sys.stderr,
                           disable=True if len(paths) < 2 else None):  # None: only on a terminal
            results.append(result)
            if not result.get("success"):
                tqdm.write(f"error: {result['file']}: {result.get('error', 'unknown error')}", file=sys.stderr)
            if args.json:
                tqdm.write(json.dumps(result), file=sys.stdout)
    succeeded = [r for r in results if r.get("success")]
    if succeeded and not args.json:
        print_table(succeeded)
    return 0 if len(succeeded) == len(results) and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
