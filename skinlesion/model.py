"""The class list, the model builder and the checkpoint format shared by training and serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torchvision import models


class LesionClass(NamedTuple):
    code: str
    name: str


# Order is the model's output order (alphabetical by HAM10000 `dx` code).
CLASSES: tuple[LesionClass, ...] = (
    LesionClass("akiec", "Actinic keratoses"),
    LesionClass("bcc", "Basal cell carcinoma"),
    LesionClass("bkl", "Benign keratosis-like lesions"),
    LesionClass("df", "Dermatofibroma"),
    LesionClass("mel", "Melanoma"),
    LesionClass("nv", "Melanocytic nevi"),
    LesionClass("vasc", "Vascular lesions"),
)
CLASS_CODES: tuple[str, ...] = tuple(c.code for c in CLASSES)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)

ARCHITECTURES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
}

# Model input (height, width): the photos' 3:4 aspect at a size two CPU cores can train and serve.
DEFAULT_IMAGE_SIZE: tuple[int, int] = (108, 144)


def build_model(arch: str, imagenet: bool = False) -> nn.Module:
    """A torchvision ResNet with a 7-way head; `imagenet=True` downloads torchvision's weights."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    constructor, imagenet_weights = ARCHITECTURES[arch]
    model = constructor(weights=imagenet_weights if imagenet else None)
    model.fc = nn.Linear(model.fc.in_features, len(CLASSES))
    return model


def save_checkpoint(model: nn.Module, arch: str, image_size: tuple[int, int], path: str | Path,
                    colour_constancy: float = 0.0) -> None:
    """Write a self-describing state dict (half precision keeps the repository small) with the preprocessing it
    was trained with (`colour_constancy`: skinlesion.image.shades_of_gray's power, 0 for none)."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(
        {"arch": arch, "image_size": list(image_size), "colour_constancy": colour_constancy,
         "classes": list(CLASS_CODES), "state_dict": state},
        path,
    )


def add_to_checkpoint(path: str | Path, **entries: Any) -> None:
    """Store extra entries (the calibration, the model card's metrics) in a checkpoint, keeping the weights."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint.update(entries)
    torch.save(checkpoint, path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by `save_checkpoint` into an eval-mode float32 model; the metadata also
    carries its "calibration" state and "card" metrics (None before `python -m training.calibrate`)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if list(checkpoint["classes"]) != list(CLASS_CODES):
        raise ValueError(f"{path}: class list {checkpoint['classes']} does not match {list(CLASS_CODES)}")
    model = build_model(checkpoint["arch"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()})
    model.to(device).eval()
    return model, {"arch": checkpoint["arch"], "image_size": tuple(checkpoint["image_size"]),
                   "colour_constancy": checkpoint.get("colour_constancy", 0.0),
                   "calibration": checkpoint.get("calibration"), "card": checkpoint.get("card")}
