"""TorchServe adapter: unpacks TorchServe's request rows, calls the core, sets per-request statuses."""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from ts.metrics.metric_type_enum import MetricTypes

from serving.admission import Ledger
from serving.service import Arrival, respond, respond_instances
from skinlesion.predictor import Predictor

log = logging.getLogger(__name__)
BUSY_STATUS = HTTPStatus.LOCKED
# TorchServe metrics (Prometheus counters on the metrics API, per model): the handler's milliseconds per stage
# summed over requests, and the requests and batches they cover; bench/latency.py divides them.
TIMER_METRIC = "Handler{stage}Milliseconds"
REQUESTS_METRIC, BATCHES_METRIC = "HandlerRequests", "HandlerBatches"
# X-Skin-Admission on the pass that nginx sends after the client's explanation rate (serving/nginx.conf's map of
# $explanation_admission; tests/test_settings.py compares).
ADMISSION_PASS = "admit"


def is_request_rows(data: Any, context: Any) -> bool:
    """Whether `data` is TorchServe's own batch: one dict per request, the body under "body" (or "data").

    TorchServe's KServe envelope (service_envelope=kserve) instead hands over the items of the one
    request's "instances", or None when it has none.
    """
    return (isinstance(data, list) and len(data) == len(context.request_ids)
            and all(isinstance(row, dict) and ("body" in row or "data" in row) for row in data))


def arrival(context: Any, idx: int) -> Arrival:
    """The request id, arrival time, client and admission pass nginx sends (X-Request-Id, X-Request-Start,
    X-Skin-Client, X-Skin-Admission); without nginx, none, now, nobody and no admission."""
    headers = {k.lower(): v for k, v in (context.get_all_request_header(idx) or {}).items()}
    try:
        seconds = float(headers.get("x-request-start", ""))
    except ValueError:
        seconds = time.time()
    return Arrival(str(headers.get("x-request-id", "")), seconds, str(headers.get("x-skin-client", "")),
                   headers.get("x-skin-admission") == ADMISSION_PASS)


def record_timings(context: Any, timings: dict[str, float], requests: int) -> None:
    """The batch's stage timings (decode, preprocess, forward: milliseconds for the whole batch) as counters."""
    for stage, milliseconds in timings.items():
        context.metrics.add_metric(TIMER_METRIC.format(stage=stage.capitalize()), milliseconds, "ms",
                                   metric_type=MetricTypes.COUNTER)
    context.metrics.add_counter(REQUESTS_METRIC, requests)
    context.metrics.add_counter(BATCHES_METRIC, 1)


def worker_device(gpu_id: int | str | None) -> str:
    """The device of one worker: TorchServe hands each worker a GPU id in turn on a host with GPUs
    (none where it has none, or where the model's config says deviceType: cpu)."""
    return f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"


class SkinHandler:
    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.explanations_at: str | None = None
        self.deadline: float | None = None
        self.ledger: Ledger | None = None

    def initialize(self, context: Any) -> None:
        settings = (context.model_yaml_config or {}).get("handler", {})
        # Workers run side by side on two cores: one torch thread each avoids oversubscription.
        torch.set_num_threads(int(settings.get("torch_threads", 1)))
        # Set for the batching pool: its explanation requests are answered 307, and nginx replays them there,
        # once admitted against the explaining workers' deadline (serving.admission).
        self.explanations_at = settings.get("explanations_at")
        model_dir = Path(context.system_properties["model_dir"])
        device = worker_device(context.system_properties.get("gpu_id"))
        self.predictor = Predictor.from_checkpoint(model_dir / context.manifest["model"]["serializedFile"], device)
        # Set for the explaining pool: seconds from arrival after which an explanation is given up.
        self.deadline = settings.get("deadline_seconds")
        self.ledger = Ledger()
        if self.deadline is not None:
            self.ledger.register_worker(float(self.deadline), self.predictor.arch)
        log.info("%s on %s", self.predictor.arch, device)

    def handle(self, data: Any, context: Any) -> list[dict]:
        if not is_request_rows(data, context):
            # The envelope wraps our list into the request's {"predictions": [...]}.
            status, payloads = respond_instances(self.predictor, data)
            context.set_response_status(status, HTTPStatus(status).phrase, 0)
            return payloads
        timings: dict[str, float] = {}
        arrivals = [arrival(context, idx) for idx in range(len(data))]
        answers = respond(self.predictor, [row.get("body", row.get("data")) for row in data], timings, self.explanations_at,
                          arrivals, self.ledger, self.deadline)
        record_timings(context, timings, len(data))
        for idx, (status, payload) in enumerate(answers):
            if "retry_after" in payload:
                # "Busy" goes out as 423: nginx answers it 503 with our message (serving/nginx.conf @busy), while
                # a 503 from TorchServe would count as the instance failing and be replayed on another.
                status = BUSY_STATUS
                context.set_response_header(idx, "Retry-After", str(payload["retry_after"]))
                context.set_response_header(idx, "X-Skin-Busy", payload["error"])
            elif status == HTTPStatus.TEMPORARY_REDIRECT:
                context.set_response_header(idx, "Location", self.explanations_at)
            context.set_response_status(status, HTTPStatus(status).phrase, idx)
        return [payload for _, payload in answers]
