"""TorchServe adapter: unpacks TorchServe's request rows, calls the core, sets per-request statuses."""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch

from skinlesion.predictor import Predictor
from skinlesion.service import respond


class SkinHandler:
    def __init__(self) -> None:
        self.predictor: Predictor | None = None

    def initialize(self, context: Any) -> None:
        settings = (context.model_yaml_config or {}).get("handler", {})
        # Workers run side by side on two cores: one torch thread each avoids oversubscription.
        torch.set_num_threads(int(settings.get("torch_threads", 1)))
        model_dir = Path(context.system_properties["model_dir"])
        self.predictor = Predictor.from_checkpoint(model_dir / context.manifest["model"]["serializedFile"])

    def handle(self, data: list[dict], context: Any) -> list[dict]:
        bodies = [row.get("body", row.get("data")) if isinstance(row, dict) else row for row in data]
        answers = respond(self.predictor, bodies)
        for idx, (status, _) in enumerate(answers):
            context.set_response_status(status, HTTPStatus(status).phrase, idx)
        return [payload for _, payload in answers]
