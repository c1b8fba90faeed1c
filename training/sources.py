"""The same lesions as photos from other sources (sizes, JPEG qualities, light crops and turns), and how the
served model's answers hold across them.

    python -m training.sources ROOT --photos FULLRES [--type resnet34] [--weights PATH] [--every 4]

Prints, for each source (rows) and group (columns), the share of images the out-of-domain check flags; then,
for each labelled group, how often the label stays that of the image as given, accuracy, top-label ECE and the
malignancy alert's sensitivity and specificity. Groups: the full-size photos of FULLRES (all, and the
original-quality files among them), every EVERY-th validation and test lesion image of ROOT (200x150 copies, so
their larger sources are upscales), and the seed-1 out-of-domain set. Every full-size photo's lesion is in the
training or validation split, so their accuracy and calibration are not test figures; with a held-out run's
weights (docs/training.md), the test column's are.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skinlesion.calibration import is_malignant, malignant_probability
from skinlesion.image import decode_image
from skinlesion.model import ARCHITECTURES
from skinlesion.predictor import Predictor
from training.data import read_samples, split_dataset
from training.evaluate import expected_calibration_error, to_json
from training.ood import out_of_domain_set

# A full-size photo is "original quality" above this file size (the others are JPEG-75 re-encodings, 20-25 KB).
ORIGINAL_QUALITY_BYTES = 100_000
Source = Callable[[Image.Image], Image.Image]


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """The image as a JPEG file of this quality would decode."""
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=quality)
    return decode_image(data.getvalue())


def at_width(width: int, quality: int) -> Source:
    """Resized to this width (its aspect kept) and saved as a JPEG of this quality."""
    def source(image: Image.Image) -> Image.Image:
        size = (width, max(1, round(width * image.height / image.width)))
        return jpeg(image.resize(size, Image.Resampling.BICUBIC), quality)
    return source


def cropped(fraction: float, degrees: float = 0.0) -> Source:
    """Rotated by `degrees`, then the central `fraction` of each side kept."""
    def source(image: Image.Image) -> Image.Image:
        turned = image.rotate(degrees, Image.Resampling.BICUBIC) if degrees else image
        margin_x, margin_y = image.width * (1 - fraction) / 2, image.height * (1 - fraction) / 2
        return turned.crop((round(margin_x), round(margin_y), round(image.width - margin_x), round(image.height - margin_y)))
    return source


# Where users' photos come from: dermatoscopes and phone adapters give 1-12 megapixels, saved at JPEG 75-95.
SOURCES: dict[str, Source] = {
    "as given": lambda image: image,
    "200x150, JPEG 75 (the training copies)": at_width(200, 75),
    "600x450, JPEG 95": at_width(600, 95),
    "1200x900, JPEG 90": at_width(1200, 90),
    "4000x3000, JPEG 85": at_width(4000, 85),
    "cropped to 90%": cropped(0.9),
    "turned a quarter": lambda image: image.transpose(Image.Transpose.ROTATE_90),
    "rotated 10 degrees, cropped to 85%": cropped(0.85, 10.0),
}


def answers(predictor: Predictor, images: list[Image.Image], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibrated probabilities N x 7, domain scores N) as served."""
    probabilities, scores = [], []
    for i in range(0, len(images), batch_size):
        inputs = torch.stack([predictor.preprocess(image) for image in images[i : i + batch_size]])
        outputs = predictor.outputs(inputs, bfloat16=predictor.bfloat16, views=predictor.views)
        probabilities.append(predictor.calibrated(outputs.logits))
        scores.append(predictor.domain_scores(outputs))
    return torch.cat(probabilities), torch.cat(scores)


def groups(root: Path, photos: Path, every: int) -> dict[str, tuple[list[Image.Image], np.ndarray | None]]:
    """Each group's images as given and its labels (None for the out-of-domain set)."""
    _, val, test = split_dataset(root, 0)
    full = sorted(read_samples(photos), key=lambda s: s.image_id)
    data = {s.image_id: s.path.read_bytes() for s in full}
    original = [s for s in full if len(data[s.image_id]) > ORIGINAL_QUALITY_BYTES]

    def decoded(samples: list) -> tuple[list[Image.Image], np.ndarray]:
        return [decode_image(s.path.read_bytes()) for s in samples], np.array([s.label for s in samples])

    test_images, test_labels = decoded(test[::every])
    rng = np.random.default_rng(1)
    damaged = [test_images[i] for i in rng.choice(len(test_images), min(60, len(test_images)), replace=False)]
    return {
        "full-size photos": decoded(full),
        "of them original quality": decoded(original),
        "validation lesions": decoded(val[::every]),
        "test lesions": (test_images, test_labels),
        "out-of-domain set": ([image for _, image in out_of_domain_set(damaged, 1)], None),
    }


def measure(predictor: Predictor, images: dict[str, tuple[list[Image.Image], np.ndarray | None]]) -> dict:
    """{group: {source: {"flagged", and for labelled groups "same_label", "accuracy", "ece", "alert_sensitivity",
    "alert_specificity"}}}."""
    threshold = predictor.calibration.malignancy_threshold
    table: dict[str, dict[str, dict[str, float]]] = {}
    for group, (pictures, labels) in images.items():
        table[group] = {}
        given = None
        for name, source in SOURCES.items():
            probabilities, scores = answers(predictor, [source(p) for p in pictures])
            row = {"flagged": float((scores > predictor.calibration.domain_threshold).float().mean())}
            if labels is not None:
                given = probabilities if given is None else given
                truth = torch.from_numpy(labels)
                alert = malignant_probability(probabilities) >= threshold
                malignant = is_malignant(truth)
                row |= {"same_label": float((probabilities.argmax(1) == given.argmax(1)).float().mean()),
                        "largest_change": float((probabilities - given).abs().max(1).values.mean()),
                        "accuracy": float((probabilities.argmax(1) == truth).float().mean()),
                        "ece": expected_calibration_error(labels, probabilities.numpy()),
                        "alert_sensitivity": float(alert[malignant].float().mean()) if malignant.any() else float("nan"),
                        "alert_specificity": float((~alert[~malignant]).float().mean())}
            table[group][name] = row
    return table


def format_table(table: dict, sizes: dict[str, int]) -> str:
    names = list(SOURCES)
    lines = ["share flagged out of domain", "| source | " + " | ".join(f"{g} ({sizes[g]})" for g in table) + " |",
             "|---|" + "---|" * len(table)]
    lines += [f"| {name} | " + " | ".join(f"{table[g][name]['flagged']:.3f}" for g in table) + " |" for name in names]
    for group, rows in table.items():
        if "accuracy" not in rows[names[0]]:
            continue
        lines += ["", f"{group}: same label as given, mean largest probability change, accuracy, ECE, alert "
                  "sensitivity / specificity", "| source | same label | change | accuracy | ECE | alert |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {r['same_label']:.3f} | {r['largest_change']:.3f} | {r['accuracy']:.3f} | {r['ece']:.3f} | "
                  f"{r['alert_sensitivity']:.3f} / {r['alert_specificity']:.3f} |" for name, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.sources", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="the HAM10000 folder training used")
    parser.add_argument("--photos", type=Path, required=True, help="a folder of full-size HAM10000 photos with metadata.csv")
    parser.add_argument("--type", choices=sorted(ARCHITECTURES), default="resnet34")
    parser.add_argument("--weights", type=Path, default=None, help="a calibrated checkpoint (default model_store/<type>.pt)")
    parser.add_argument("--every", type=int, default=4, help="use every N-th validation and test image")
    parser.add_argument("--json", action="store_true",
                        help="store the table in the weights' report (<weights>.json) under \"sources\" for the model card")
    args = parser.parse_args(argv)
    weights = args.weights or Path("model_store") / f"{args.type}.pt"
    try:
        predictor = Predictor.from_checkpoint(weights)
        if predictor.calibration is None:
            raise ValueError("the checkpoint is not calibrated: run python -m training.calibrate first")
        images = groups(args.root, args.photos, args.every)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sizes = {group: len(pictures) for group, (pictures, _) in images.items()}
    table = measure(predictor, images)
    print(format_table(table, sizes))
    if args.json:
        report_path = weights.with_suffix(".json")
        report = json.loads(report_path.read_text())
        report["sources"] = {"every": args.every, "images": sizes, "table": table}
        report_path.write_text(to_json(report))
        print(f"wrote {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
