"""Evaluate a checkpoint on labelled HAM10000 images with the serving predictor.

    python -m training.evaluate ROOT --type resnet34 --weights model_store/resnet34.pt [--json OUT]
        [--split all|validation|test] [--views none|flips|dihedral] [--compare-bfloat16]
        [--ensemble model_store/resnet18.pt ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from skinlesion.calibration import MALIGNANT_INDICES
from skinlesion.image import TTA_VIEWS, decode_image
from skinlesion.model import ARCHITECTURES, CLASS_CODES
from skinlesion.predictor import Predictor
from training.data import Sample, read_samples, split_dataset

MELANOMA = CLASS_CODES.index("mel")
# Simulated label draws behind calibration_error_floor: its 95th percentile moves by about 0.001 between seeds.
ECE_FLOOR_DRAWS = 1000


def confidence_bins(confidence: np.ndarray, bins: int = 15) -> np.ndarray:
    """N x bins one-hot membership of equal-width confidence bins."""
    which = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1]), 0, bins - 1)
    return np.eye(bins)[which]


def binned_calibration_gap(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> np.ndarray:
    """|confidence - accuracy| averaged over equal-width confidence bins weighted by their size, for each row of
    `correct` (N, or D x N for D sets of outcomes of the same predictions)."""
    membership = confidence_bins(confidence, bins)
    return np.abs(correct @ membership - confidence @ membership).sum(axis=-1) / len(confidence)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: the gap between confidence and accuracy, averaged over equal-width bins."""
    return float(binned_calibration_gap(probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64), bins))


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> list[dict]:
    """Per equal-width bin of top-label confidence: its images, their mean confidence and accuracy (the points of a
    reliability diagram; empty bins left out)."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    membership = confidence_bins(confidence, bins).astype(bool)
    return [{"low": i / bins, "high": (i + 1) / bins, "images": int(inside.sum()),
             "confidence": float(confidence[inside].mean()), "accuracy": float(correct[inside].mean())}
            for i, inside in enumerate(membership.T) if inside.any()]


def malignant_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE of `malignant_probability` as a probability of its own: the gap between P(malignant) and the share of
    malignant lesions, averaged over equal-width bins of P(malignant). The top-label ECE cannot see a model that
    spreads probability towards the rarer classes while its top label stays well calibrated."""
    malignant = np.asarray(probs, dtype=np.float64)[:, MALIGNANT_INDICES].sum(axis=1)
    return float(binned_calibration_gap(malignant, np.isin(labels, MALIGNANT_INDICES).astype(np.float64), bins))


def calibration_error_floor(probs: np.ndarray, draws: int = ECE_FLOOR_DRAWS, seed: int = 0) -> dict[str, float]:
    """The ECE a perfectly calibrated model would measure on these images: each top label drawn to be right with
    exactly its stated probability. ECE on a finite set is biased upwards (each bin's accuracy is a noisy count),
    so a measured ECE is read against this: its mean, and the 95th percentile over the draws."""
    confidence = np.asarray(probs, dtype=np.float64).max(axis=1)
    outcomes = (np.random.default_rng(seed).random((draws, len(confidence))) < confidence).astype(np.float64)
    gaps = binned_calibration_gap(confidence, outcomes)
    return {"mean": float(gaps.mean()), "p95": float(np.percentile(gaps, 95))}


def one_vs_rest_aucs(labels: np.ndarray, probs: np.ndarray) -> dict[int, float]:
    """ROC AUC of each class's probability against the rest, for the classes present and not alone."""
    aucs = {}
    for k in range(probs.shape[1]):
        positives = labels == k
        if 0 < positives.sum() < len(labels):
            aucs[k] = float(roc_auc_score(positives, probs[:, k]))
    return aucs


def macro_auc(aucs: dict[int, float]) -> float:
    """The mean of one_vs_rest_aucs (NaN when no class has both positives and negatives)."""
    return float(np.mean(list(aucs.values()))) if aucs else float("nan")


def compute_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Every reported metric for integer labels (N) and class probabilities (N x 7)."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    preds = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    classes = list(range(len(CLASS_CODES)))
    matrix = confusion_matrix(labels, preds, labels=classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=classes, zero_division=0
    )
    aucs = one_vs_rest_aucs(labels, probs)
    mel_negatives = labels != MELANOMA
    malignant = np.isin(labels, MALIGNANT_INDICES)
    return {
        "n_images": int(len(labels)),
        "accuracy": float((preds == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
        "macro_auc": macro_auc(aucs),
        "melanoma_auc": aucs.get(MELANOMA, float("nan")),
        # Malignant (melanoma, basal cell carcinoma, actinic keratoses) against benign, on the summed probability.
        "malignant_auc": float(roc_auc_score(malignant, probs[:, MALIGNANT_INDICES].sum(axis=1)))
        if 0 < malignant.sum() < len(labels) else float("nan"),
        "melanoma_sensitivity": float(recall[MELANOMA]) if support[MELANOMA] else float("nan"),
        "melanoma_specificity": float((preds[mel_negatives] != MELANOMA).mean()) if mel_negatives.any() else float("nan"),
        "expected_calibration_error": expected_calibration_error(labels, probs),
        "expected_calibration_error_if_calibrated": calibration_error_floor(probs),
        "malignant_calibration_error": malignant_calibration_error(labels, probs),
        "per_class": {
            code: {
                "precision": float(precision[k]),
                # Against precision: whether the model states more or less confidence than it earns when it names this class.
                "mean_confidence": float(confidence[preds == k].mean()) if (preds == k).any() else float("nan"),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "auc": aucs.get(k, float("nan")),
                "support": int(support[k]),
                # Against support / n_images: whether probability leans towards or away from this class.
                "mean_probability": float(probs[:, k].mean()) if len(labels) else float("nan"),
            }
            for k, code in enumerate(CLASS_CODES)
        },
        "confusion_matrix": matrix.tolist(),
        "classes": list(CLASS_CODES),
    }


def predict_samples(predictor: Predictor, samples: list[Sample], batch_size: int = 64, bfloat16: bool | None = None,
                    views: str | None = None) -> np.ndarray:
    """Class probabilities for samples' image files, decoded, preprocessed and run exactly as served, or with
    the trunk in bfloat16 or not and over these test-time views."""
    bfloat16 = predictor.bfloat16 if bfloat16 is None else bfloat16
    views = predictor.views if views is None else views
    chunks = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        inputs = torch.stack([predictor.preprocess(decode_image(s.path.read_bytes())) for s in batch])
        chunks.append(predictor.calibrated(predictor.outputs(inputs, batch_size, bfloat16, False, views).logits).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, len(CLASS_CODES)))


def to_json(value: object) -> str:
    """Strict JSON: metrics that are undefined here (NaN, e.g. a class absent from the data) and unbounded
    thresholds (inf) become null."""

    def clean(v: object) -> object:
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), indent=2, allow_nan=False) + "\n"


def format_report(metrics: dict) -> str:
    lines = [
        f"images                 {metrics['n_images']}",
        f"accuracy               {metrics['accuracy']:.4f}",
        f"balanced accuracy      {metrics['balanced_accuracy']:.4f}",
        f"macro ROC AUC (OvR)    {metrics['macro_auc']:.4f}",
        f"melanoma ROC AUC       {metrics['melanoma_auc']:.4f}",
        f"malignant ROC AUC      {metrics['malignant_auc']:.4f}",
        f"melanoma sensitivity   {metrics['melanoma_sensitivity']:.4f}",
        f"melanoma specificity   {metrics['melanoma_specificity']:.4f}",
        f"calibration error      {metrics['expected_calibration_error']:.4f} (perfectly calibrated, on as many images: "
        f"{metrics['expected_calibration_error_if_calibrated']['mean']:.4f}, 95% below "
        f"{metrics['expected_calibration_error_if_calibrated']['p95']:.4f})",
        f"P(malignant) ECE       {metrics['malignant_calibration_error']:.4f}",
        "",
        f"{'class':<6} {'precision':>9} {'conf':>6} {'recall':>7} {'f1':>6} {'auc':>6} {'n':>5} {'share':>6} {'mean p':>6}",
    ]
    for code, m in metrics["per_class"].items():
        lines.append(
            f"{code:<6} {m['precision']:>9.3f} {m['mean_confidence']:>6.3f} {m['recall']:>7.3f} {m['f1']:>6.3f}"
            f" {m['auc']:>6.3f} {m['support']:>5} {m['support'] / max(metrics['n_images'], 1):>6.3f}"
            f" {m['mean_probability']:>6.3f}"
        )
    lines += ["", "confusion matrix (rows: true, columns: predicted)", "       " + " ".join(f"{c:>5}" for c in CLASS_CODES)]
    rows = zip(CLASS_CODES, metrics["confusion_matrix"], strict=True)
    lines += [f"{code:<6} " + " ".join(f"{n:>5}" for n in row) for code, row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="folder with HAM10000_metadata.csv (or metadata.csv) and images beneath")
    parser.add_argument("--type", choices=sorted(ARCHITECTURES), default="resnet34")
    parser.add_argument("--weights", type=Path, default=None, help="checkpoint (default model_store/<type>.pt)")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--split", choices=("all", "validation", "test"), default="all",
                        help="all: every listed image found; validation, test: the training command's (same --seed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="with --split validation|test: the training run's split seed (its --split-seed, else --seed)")
    parser.add_argument("--views", choices=TTA_VIEWS, default=None,
                        help="test-time views averaged (none: 1, flips: 4, dihedral: 8); default: as the checkpoint serves")
    parser.add_argument("--compare-bfloat16", action="store_true",
                        help="score with a float32 trunk, then also run it in bfloat16 and print how often the label "
                        "agrees and the largest probability change")
    parser.add_argument("--ensemble", type=Path, nargs="+", default=[], metavar="CHECKPOINT",
                        help="average the calibrated probabilities with these checkpoints' (each run as it serves): a "
                        "reference figure, since the service answers with one model")
    args = parser.parse_args(argv)
    if args.ensemble and args.compare_bfloat16:
        parser.error("--compare-bfloat16 compares one checkpoint: leave out --ensemble")
    weights = args.weights or Path("model_store") / f"{args.type}.pt"
    try:
        if args.split != "all":
            samples = split_dataset(args.root, args.seed)[("validation", "test").index(args.split) + 1]
        else:
            samples = [s for s in read_samples(args.root, require_images=False) if s.path is not None]
        if not samples:
            raise FileNotFoundError(f"none of the images listed in {args.root}'s metadata is under it")
        predictor = Predictor.from_checkpoint(weights)
        if predictor.arch != args.type:
            raise ValueError(f"{weights} holds a {predictor.arch}, not a {args.type}")
        members = [Predictor.from_checkpoint(path) for path in args.ensemble]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    probs = predict_samples(predictor, samples, args.batch_size, False if args.compare_bfloat16 else None, args.views)
    for member in members:
        probs = probs + predict_samples(member, samples, args.batch_size, views=args.views)
    probs = probs / (1 + len(members))
    metrics = compute_metrics(np.array([s.label for s in samples]), probs)
    views = args.views or predictor.views
    metrics.update(model=args.type, weights=str(weights), views=views)
    if members:
        metrics["ensemble"] = [str(path) for path in args.ensemble]
        print(f"ensemble               {weights} + {' + '.join(map(str, args.ensemble))}, probabilities averaged")
    print(f"test-time views        {views}\n" + format_report(metrics))
    if args.compare_bfloat16:
        fast = predict_samples(predictor, samples, args.batch_size, bfloat16=True, views=args.views)
        agree = float((fast.argmax(1) == probs.argmax(1)).mean())
        print(f"\nbfloat16 trunk: same label for {agree:.4f} of the images, largest probability change "
              f"{float(np.abs(fast - probs).max()):.4f}")
    if args.json:
        args.json.write_text(to_json(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
