"""A plain-Python predictor: a trained model plus the shared preprocessing, no server attached."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from skinlesion.calibration import MALIGNANT_CODES, Calibration, input_statistics, malignant_probability
from skinlesion.image import TTA_VIEWS, dihedral_views, preprocess
from skinlesion.model import CLASS_CODES, CLASS_NAMES, CLASSES, load_checkpoint
from skinlesion.options import COVERAGE_LEVELS, DEFAULT_COVERAGE

UNCALIBRATED = {
    "code": "uncalibrated",
    "message": "this model has no fitted calibration: its probabilities are uncalibrated, and neither the "
    "out-of-domain check nor the malignancy alert is made (python -m training.calibrate fits them)",
}


@functools.cache
def native_bfloat16(device_type: str) -> bool:
    """Whether the device computes bfloat16 natively: CUDA, or an x86 CPU with avx512_bf16 or AMX.

    There the convolutional trunk runs in bfloat16 for LIME's perturbed images and, where the calibration was
    fitted that way, for plain predictions (the classifier layer stays float32, see Predictor.outputs):
    resnet34 at 108x144 on one core of this project's CPU, batch 64, took 11.7 ms an image against 22.5 in
    float32. Elsewhere bfloat16 is emulated and slower than float32, so float32 stays.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return device_type == "cpu" and ("avx512_bf16" in flags or "amx_bf16" in flags)


@dataclass(frozen=True)
class Outputs:
    """The raw network outputs for a batch (all on the CPU, float32)."""

    logits: torch.Tensor  # N x 7, before the temperatures
    features: torch.Tensor  # N x D, the pooled features the classifier reads
    statistics: torch.Tensor | None  # N x INPUT_STATISTICS, calibration.input_statistics (None when not asked for)


class Predictor:
    def __init__(self, model: nn.Module, arch: str, image_size: tuple[int, int], device: str = "cpu",
                 calibration: Calibration | None = None, card: dict | None = None, colour_constancy: float = 0.0) -> None:
        # channels_last: oneDNN's convolutions are about 12% faster on it (bench/explain.py prints both layouts).
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        # Every architecture is a torchvision ResNet: all its children but the classifier `fc`, in order.
        self.trunk = nn.Sequential(*list(self.model.children())[:-1])
        self.arch = arch
        self.image_size = tuple(image_size)
        self.colour_constancy = colour_constancy
        self.device = torch.device(device)
        self.calibration = calibration
        # The test-split metrics `python -m training.calibrate` stored beside the calibration.
        self.card = card
        # How plain predictions run: the test-time views and trunk dtype the calibration was fitted for
        # (bfloat16 only where the hardware has it: the probabilities differ by at most about 0.01).
        self.views = calibration.views if calibration else "none"
        self.bfloat16 = bool(calibration and calibration.bfloat16 and native_bfloat16(self.device.type))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Predictor:
        model, meta = load_checkpoint(path, device)
        calibration = Calibration.from_state(meta["calibration"]) if meta["calibration"] else None
        return cls(model, meta["arch"], meta["image_size"], device, calibration, meta["card"], meta["colour_constancy"])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.image_size, self.colour_constancy)

    def outputs(self, inputs: torch.Tensor, batch_size: int = 64, bfloat16: bool = False,
                statistics: bool = True, views: str = "none") -> Outputs:
        """Logits, pooled features and (with `statistics`) input statistics for preprocessed inputs (N x 3 x H x W).

        `bfloat16` runs the convolutional trunk in bfloat16 (about 2x faster where the hardware has it) and keeps
        the classifier in float32: logits rounded to bfloat16's 8 bits made LIME's ranking of regions change
        from seed to seed in a one-off check on a HAM10000 photo. `views` (skinlesion.image.TTA_VIEWS) averages
        the pooled features over that many flips and transposes of each input; the classifier being linear,
        the logits are the average of the views' logits.
        """
        logits, features, stats = [], [], []
        with torch.inference_mode():
            for chunk in inputs.split(batch_size):
                chunk = chunk.to(self.device, memory_format=torch.channels_last)
                # Views of one shape go through the trunk as one batch: 4 images at once cost less than 4 single ones.
                by_shape: dict[torch.Size, list[torch.Tensor]] = {}
                for view in dihedral_views(chunk, views):
                    by_shape.setdefault(view.shape, []).append(view)
                with torch.autocast(self.device.type, torch.bfloat16, enabled=bfloat16):
                    pooled = torch.cat([
                        self.trunk(torch.cat(group).contiguous(memory_format=torch.channels_last)).float()
                        .unflatten(0, (len(group), len(chunk)))
                        for group in by_shape.values()
                    ]).mean(0)
                pooled = pooled.flatten(1)
                logits.append(self.model.fc(pooled).cpu())
                features.append(pooled.cpu())
                if statistics:
                    stats.append(input_statistics(chunk).cpu())
        return Outputs(torch.cat(logits), torch.cat(features), torch.cat(stats) if statistics else None)

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities at the fitted temperatures (plain softmax for an uncalibrated checkpoint)."""
        return self.calibration.probabilities(logits) if self.calibration else logits.softmax(dim=-1)

    def probabilities(self, inputs: torch.Tensor, batch_size: int = 64, bfloat16: bool = False,
                      calibrated: bool = True) -> torch.Tensor:
        """Calibrated probabilities (N x 7, on the CPU) for preprocessed inputs (N x 3 x H x W), or without
        `calibrated` the network's own softmax. Without the input statistics: on LIME's batches of 64 they cost
        about 40 ms, some 6% of the batch, for nothing."""
        logits = self.outputs(inputs, batch_size, bfloat16, statistics=False).logits
        return self.calibrated(logits) if calibrated else logits.softmax(dim=-1)

    def domain_scores(self, outputs: Outputs) -> torch.Tensor | None:
        """Per image, how unlike the training lesions it looks (calibration.Calibration.domain_score)."""
        return self.calibration.domain_score(outputs.statistics, outputs.features) if self.calibration else None

    def describe(self, probabilities: torch.Tensor, domain_score: float | None = None,
                 coverage: float = DEFAULT_COVERAGE) -> dict:
        """The response fields for one image's calibrated probability vector and domain score, with its prediction
        set at `coverage` (skinlesion.options.COVERAGE_LEVELS)."""
        best = int(probabilities.argmax())
        malignant = float(malignant_probability(probabilities))
        answer = {
            "prediction": CLASS_NAMES[best],
            "probability": float(probabilities[best]),
            "probabilities": {name: float(p) for name, p in zip(CLASS_NAMES, probabilities, strict=True)},
            "model": self.arch,
            "malignant_probability": malignant,
            "malignancy_alert": None,
            "in_domain": None,
            "domain_score": None,
            "prediction_set": None,
            "set_coverage": None,
            "warnings": [],
        }
        if self.calibration is None:
            answer["warnings"].append(UNCALIBRATED)
            return answer
        answer["malignancy_alert"] = malignant >= self.calibration.malignancy_threshold
        if domain_score is not None:
            answer["domain_score"] = round(float(domain_score), 3)
            answer["in_domain"] = bool(domain_score <= self.calibration.domain_threshold)
            if not answer["in_domain"]:
                answer["warnings"].append({
                    "code": "out_of_domain",
                    "message": f"this image does not look like the dermatoscopic lesion photos the model was trained "
                    f"on (domain score {domain_score:.1f}, lesions score at most {self.calibration.domain_threshold:.1f}): "
                    "the prediction is likely meaningless" + ("; its prediction set holds every class, as the coverage "
                                                              "holds only for photos like them" if self.calibration.sets else ""),
                })
        if self.calibration.sets is not None:
            members = (self.calibration.sets.members(probabilities[None], coverage)[0] if answer["in_domain"] is not False
                       else torch.ones(len(CLASS_NAMES), dtype=torch.bool))
            answer["prediction_set"] = [CLASS_NAMES[k] for k in probabilities.argsort(descending=True, stable=True).tolist()
                                        if members[k]]
            answer["set_coverage"] = coverage
        return answer

    def predict(self, images: list[Image.Image], timings: dict[str, float] | None = None,
                coverages: list[float] | None = None) -> list[dict]:
        """Response fields per image, with each image's prediction set at its `coverages` entry (default
        DEFAULT_COVERAGE); `timings` (if given) gets the milliseconds spent preprocessing and in the model."""
        start = time.perf_counter()
        inputs = torch.stack([self.preprocess(image) for image in images])
        preprocessed = time.perf_counter()
        outputs = self.outputs(inputs, bfloat16=self.bfloat16, views=self.views)
        probabilities = self.calibrated(outputs.logits)
        scores = self.domain_scores(outputs)
        if timings is not None:
            timings["preprocess"] = (preprocessed - start) * 1000
            timings["forward"] = (time.perf_counter() - preprocessed) * 1000
        coverages = coverages or [DEFAULT_COVERAGE] * len(images)
        return [self.describe(p, None if scores is None else float(scores[i]), coverages[i])
                for i, p in enumerate(probabilities)]

    def model_card(self) -> dict:
        """What GET /model answers: the model, its calibration and thresholds, and its measured test metrics."""
        calibration = self.calibration
        return {
            "architecture": self.arch,
            "version": self.arch,
            "classes": [{"code": c.code, "name": c.name} for c in CLASSES],
            "input_size": {"height": self.image_size[0], "width": self.image_size[1]},
            "calibrated": calibration is not None,
            # Applied by predicted class: an image predicted `code` has its logits divided by temperatures[code].
            "temperatures": dict(zip(CLASS_CODES, calibration.temperatures, strict=True)) if calibration else None,
            # How every plain prediction is computed: test-time views averaged, and the trunk's dtype (under the key
            # "precision", as GET /model has always named it).
            "inference": {"views": self.views, "view_count": TTA_VIEWS[self.views],
                          "precision": "bfloat16" if self.bfloat16 else "float32"},
            "thresholds": {
                "out_of_domain": calibration.domain_threshold if calibration else None,
                "malignancy": calibration.malignancy_threshold if calibration else None,
            },
            "malignant_classes": list(MALIGNANT_CODES),
            # The levels a request may ask its prediction set for, and each class's fitted threshold per level
            # (null: the class is in every set at that level, too few validation images to exclude it).
            "prediction_sets": {
                "levels": list(COVERAGE_LEVELS), "default": DEFAULT_COVERAGE, "score": calibration.sets.score,
                "thresholds": {str(level): {code: None if math.isinf(x) else x for code, x in zip(CLASS_CODES, t, strict=True)}
                               for level, t in calibration.sets.thresholds.items()},
            } if calibration and calibration.sets else None,
            "test_metrics": self.card,
        }
