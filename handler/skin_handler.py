"""TorchServe adapter: unpacks TorchServe's request rows, calls the core, sets per-request statuses."""

from __future__ import annotations

import logging
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch

from skinlesion.predictor import Predictor
from skinlesion.service import respond, respond_instances

log = logging.getLogger(__name__)


def is_request_rows(data: Any, context: Any) -> bool:
    """Whether `data` is TorchServe's own batch: one dict per request, the body under "body" (or "data").

    TorchServe's KServe envelope (service_envelope=kserve) instead hands over the items of the one
    request's "instances", or None when it has none.
    """
    return (isinstance(data, list) and len(data) == len(context.request_ids)
            and all(isinstance(row, dict) and ("body" in row or "data" in row) for row in data))


def worker_device(gpu_id: int | str | None) -> str:
    """The device of one worker: TorchServe hands each worker a GPU id in turn on a host with GPUs
    (none where it has none, or where the model's config says deviceType: cpu)."""
    return f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"


class SkinHandler:
    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.explanations_at: str | None = None

    def initialize(self, context: Any) -> None:
        settings = (context.model_yaml_config or {}).get("handler", {})
        # Workers run side by side on two cores: one torch thread each avoids oversubscription.
        torch.set_num_threads(int(settings.get("torch_threads", 1)))
        # Set for the batching pool: its explanation requests are answered 307, and nginx replays them there.
        self.explanations_at = settings.get("explanations_at")
        model_dir = Path(context.system_properties["model_dir"])
        device = worker_device(context.system_properties.get("gpu_id"))
        self.predictor = Predictor.from_checkpoint(model_dir / context.manifest["model"]["serializedFile"], device)
        log.info("%s on %s", self.predictor.arch, device)

    def handle(self, data: Any, context: Any) -> list[dict]:
        if not is_request_rows(data, context):
            # The envelope wraps our list into the request's {"predictions": [...]}.
            status, payloads = respond_instances(self.predictor, data)
            context.set_response_status(status, HTTPStatus(status).phrase, 0)
            return payloads
        timings: dict[str, float] = {}
        answers = respond(self.predictor, [row.get("body", row.get("data")) for row in data], timings, self.explanations_at)
        # One line per batch in model_log.log: bench/serve.py splits the served latency with it.
        log.info("handler_ms batch=%d %s", len(data), " ".join(f"{k}={v:.2f}" for k, v in timings.items()))
        for idx, (status, _) in enumerate(answers):
            context.set_response_status(status, HTTPStatus(status).phrase, idx)
            if status == HTTPStatus.TEMPORARY_REDIRECT:
                context.set_response_header(idx, "Location", self.explanations_at)
        return [payload for _, payload in answers]
