"""A plain-Python predictor: a trained model plus the shared preprocessing, no server attached."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from skinlesion.image import preprocess
from skinlesion.model import CLASS_NAMES, load_checkpoint


class Predictor:
    def __init__(self, model: nn.Module, arch: str, image_size: tuple[int, int], device: str = "cpu") -> None:
        # channels_last: oneDNN's convolutions are about 12% faster on it (bench/explain.py prints both layouts).
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        # Every architecture is a torchvision ResNet: all its children but the classifier `fc`, in order.
        self.trunk = nn.Sequential(*list(self.model.children())[:-1])
        self.arch = arch
        self.image_size = tuple(image_size)
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Predictor:
        model, meta = load_checkpoint(path, device)
        return cls(model, meta["arch"], meta["image_size"], device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.image_size)

    def probabilities(self, inputs: torch.Tensor, batch_size: int = 64, bfloat16: bool = False) -> torch.Tensor:
        """Softmax probabilities (N x 7, on the CPU) for preprocessed inputs (N x 3 x H x W).

        `bfloat16` runs the convolutional trunk in bfloat16 (LIME's perturbed images: about 2x faster where the
        hardware has it) and keeps the classifier in float32: logits rounded to bfloat16's 8 bits made LIME's
        ranking of regions change from seed to seed in a one-off check on a HAM10000 photo.
        """
        answers = []
        with torch.inference_mode():
            for chunk in inputs.split(batch_size):
                with torch.autocast(self.device.type, torch.bfloat16, enabled=bfloat16):
                    features = self.trunk(chunk.to(self.device, memory_format=torch.channels_last))
                answers.append(self.model.fc(features.float().flatten(1)).softmax(dim=1).cpu())
        return torch.cat(answers)

    def describe(self, probabilities: torch.Tensor) -> dict:
        """The response fields for one image's probability vector."""
        best = int(probabilities.argmax())
        return {
            "prediction": CLASS_NAMES[best],
            "probability": float(probabilities[best]),
            "probabilities": {name: float(p) for name, p in zip(CLASS_NAMES, probabilities, strict=True)},
            "model": self.arch,
        }

    def predict(self, images: list[Image.Image], timings: dict[str, float] | None = None) -> list[dict]:
        """Response fields per image; `timings` (if given) gets the milliseconds spent preprocessing and in the model."""
        start = time.perf_counter()
        inputs = torch.stack([self.preprocess(image) for image in images])
        preprocessed = time.perf_counter()
        probabilities = self.probabilities(inputs)
        if timings is not None:
            timings["preprocess"] = (preprocessed - start) * 1000
            timings["forward"] = (time.perf_counter() - preprocessed) * 1000
        return [self.describe(p) for p in probabilities]
