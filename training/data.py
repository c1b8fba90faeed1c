"""HAM10000 metadata, image discovery and lesion-grouped splits."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from skinlesion.model import CLASS_CODES
from skinlesion.options import IMAGE_SUFFIXES

METADATA_NAMES = ("HAM10000_metadata.csv", "metadata.csv")
TRAIN_FOLDER, TEST_FOLDER = "HAM10000_images_train", "HAM10000_images_test"


@dataclass(frozen=True)
class Sample:
    image_id: str
    lesion_id: str
    label: int
    path: Path | None


def lesion_folds(lesions: list[str], folds: int, seed: int = 0) -> torch.Tensor:
    """Each image's fold: the lesions shuffled (seeded) and dealt round, so a lesion's images share one fold."""
    order = np.random.default_rng(seed).permutation(sorted(set(lesions)))
    fold_of = {lesion: i % folds for i, lesion in enumerate(order)}
    return torch.tensor([fold_of[lesion] for lesion in lesions])


def find_metadata(root: Path) -> Path:
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"no metadata file in {root}: expected one of {', '.join(METADATA_NAMES)}")


def read_samples(root: str | Path, require_images: bool = True) -> list[Sample]:
    """Every metadata row as a Sample whose path is the image found anywhere beneath `root`.

    With `require_images` a listed image that is absent is an error; without it, its path is None.
    """
    root = Path(root)
    metadata = find_metadata(root)
    images = {p.stem: p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    samples, missing = [], []
    with metadata.open(newline="") as f:
        reader = csv.DictReader(f)
        absent = {"lesion_id", "image_id", "dx"} - set(reader.fieldnames or ())
        if absent:
            raise ValueError(f"{metadata}: missing column(s) {', '.join(sorted(absent))}")
        for line, row in enumerate(reader, start=2):
            if row["dx"] not in CLASS_CODES:
                raise ValueError(
                    f"{metadata}, line {line}: unknown class code {row['dx']!r} (known: {', '.join(CLASS_CODES)})"
                )
            path = images.get(row["image_id"])
            if path is None:
                missing.append(row["image_id"])
            samples.append(Sample(row["image_id"], row["lesion_id"], CLASS_CODES.index(row["dx"]), path))
    if require_images and missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {metadata} are not under {root}: {shown}")
    return samples


def grouped_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split off about `fraction` of the samples, stratified by class, never splitting a lesion."""
    labels = np.array([s.label for s in samples])
    groups = np.array([s.lesion_id for s in samples])
    folds = StratifiedGroupKFold(n_splits=max(2, round(1 / fraction)), shuffle=True, random_state=seed)
    keep, held = next(folds.split(np.zeros(len(samples)), labels, groups))
    return [samples[i] for i in keep], [samples[i] for i in held]


def split_dataset(
    root: str | Path, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.2, train_on_test: bool = False
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, validation, test). The test side is the `HAM10000_images_test` folder when present. With
    `train_on_test` the test side joins the training side and the test list is empty; the validation split is
    the same either way."""
    samples = read_samples(root)
    test_root = Path(root) / TEST_FOLDER
    if test_root.is_dir():
        test = [s for s in samples if test_root in s.path.parents]
        train = [s for s in samples if test_root not in s.path.parents]
        leaked = {s.lesion_id for s in test} & {s.lesion_id for s in train}
        if leaked:
            raise ValueError(f"{len(leaked)} lesion(s) have images on both sides of {root}'s train/test folders")
    else:
        train, test = grouped_split(samples, test_fraction, seed)
    train, val = grouped_split(train, val_fraction, seed)
    return (train + test, val, []) if train_on_test else (train, val, test)
