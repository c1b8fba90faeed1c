"""Fit a checkpoint's calibration (temperatures, out-of-domain check, malignancy alert), store it in the
checkpoint, and report it on the test split. Rerun whenever the weights change (training runs it too).

    python -m training.calibrate ROOT --type resnet34 [--weights model_store/resnet34.pt] [--json model_store/resnet34.json]
        [--views flips] [--bfloat16] [--held-out REPORT]

Fitted on the training split (class Gaussians) and the validation split (temperatures, thresholds); the
out-of-domain score is chosen on validation lesions against one draw of the out-of-domain set
(training/ood.py, seed 0, damaged validation lesions) and reported on test lesions against another
(seed 1, damaged test lesions). Everything is fitted for one way of running the network, which the
checkpoint then serves with: test-time views and a bfloat16 trunk (defaults chosen on validation,
docs/training.md). Weights trained on the test split too (python -m training --train-on-test) are fitted the
same way on the validation split, but carry the test figures of the same recipe's run that held the test split out
(--held-out REPORT), marked so.

The calibrators compared with the shipped one are in training/compare_calibrators.py; the report's keys, and the
text printed of it, in training/reports.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from skinlesion.calibration import Calibration, input_statistics, is_malignant, malignant_probability
from skinlesion.image import TTA_VIEWS, decode_image
from skinlesion.model import ARCHITECTURES, CLASS_CODES, add_to_checkpoint, load_checkpoint
from skinlesion.predictor import Outputs, Predictor, native_bfloat16
from training.compare_calibrators import (
    OUT_OF_FOLD_DEALS,
    RESPLITS,
    add_comparison_argument,
    compare_out_of_fold,
    compare_resplits,
    nll,
)
from training.conformal import choose_sets, sets_on_test
from training.data import Sample, read_samples, split_dataset
from training.evaluate import compute_metrics, reliability_bins, to_json
from training.fitting import FitData, fit_calibration, fit_class_gaussians, validation_pass_rate
from training.ood import REPORT_SEED, SELECTION_SEED, out_of_domain_set
from training.reports import (
    HELD_OUT_KEYS,
    CalibrationReport,
    CalibrationResult,
    ScoredRun,
    SelectionSet,
    SplitMetrics,
    card_metrics,
    format_calibration,
)
from training.sources import SOURCES

# How checkpoints run unless told otherwise (chosen on the validation split, docs/training.md): the four flips
# averaged (adding the four transposes did not help consistently), the trunk in bfloat16 where the hardware has it, which pays
# for one of the three extra views (python -m bench.inference).
INFERENCE_VIEWS = "flips"
INFERENCE_BFLOAT16 = True
# Lesions damaged for each out-of-domain draw (half cropped away, half blurred).
DAMAGED_LESIONS = 60


def decode_samples(samples: list[Sample]) -> list[Image.Image]:
    return [decode_image(s.path.read_bytes()) for s in samples]


def image_outputs(predictor: Predictor, images: list[Image.Image], batch_size: int = 64, views: str | None = None,
                  bfloat16: bool | None = None) -> Outputs:
    """Raw network outputs for RGB images, preprocessed exactly as served and run as served (or with these
    test-time views and trunk dtype)."""
    views = predictor.views if views is None else views
    bfloat16 = predictor.bfloat16 if bfloat16 is None else bfloat16
    parts = [predictor.outputs(torch.stack([predictor.preprocess(im) for im in images[i : i + batch_size]]),
                               bfloat16=bfloat16, views=views)
             for i in range(0, len(images), batch_size)]
    return Outputs(*(torch.cat([getattr(p, field) for p in parts]) for field in ("logits", "features", "statistics")))


def fit_data(outputs: Outputs, samples: list[Sample]) -> FitData:
    return FitData(outputs.logits, outputs.features, outputs.statistics, torch.tensor([s.label for s in samples]))


def auroc(in_domain: torch.Tensor, out_of_domain: torch.Tensor) -> float:
    """How well higher scores pick out the out-of-domain images (1.0 = perfectly)."""
    truth = np.r_[np.zeros(len(in_domain)), np.ones(len(out_of_domain))]
    return float(roc_auc_score(truth, np.r_[in_domain.numpy(), out_of_domain.numpy()]))


def channel_statistics(predictor: Predictor, images: list[Image.Image]) -> torch.Tensor:
    """The input statistics the check read before: sharpness per colour channel at full and half resolution."""
    return torch.cat([input_statistics(torch.stack([predictor.preprocess(im) for im in images[i : i + 256]]), (1, 2), luma=False)
                      for i in range(0, len(images), 256)])


# The image groups each candidate score is re-checked on besides the validation lesions as given: the same lesions
# from other sources (training/sources.py), and full-size photos where given (--photos).
RECHECKED_SOURCES = ("1200x900, JPEG 90", "rotated 10 degrees, cropped to 85%")


def score_candidates(train: FitData, val: FitData, ood: Outputs, rechecked: dict[str, Outputs],
                     channels: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Each candidate out-of-domain score on validation lesions ("val"), on the out-of-domain images ("ood"), and on
    each group of `rechecked`; `channels` holds channel_statistics of "train", "val", "ood" and every rechecked group."""
    groups = {"val": val, "ood": ood, **rechecked}

    def each(score: Callable) -> dict[str, torch.Tensor]:
        return {name: score(name, group) for name, group in groups.items()}

    gaussians = {name: fit_class_gaussians(getattr(train, name), train.labels, getattr(val, name))
                 for name in ("statistics", "features")}
    before = fit_class_gaussians(channels["train"], train.labels, channels["val"])
    candidates = {
        "softmax confidence": each(lambda _, g: -g.logits.softmax(1).max(1).values),
        "max logit": each(lambda _, g: -g.logits.max(1).values),
        "energy": each(lambda _, g: -g.logits.logsumexp(1)),
        "Mahalanobis, channel sharpness (before)": each(lambda name, _: before.zscores(channels[name])),
        "Mahalanobis, input statistics": each(lambda _, g: gaussians["statistics"].zscores(g.statistics)),
        "Mahalanobis, pooled features": each(lambda _, g: gaussians["features"].zscores(g.features)),
    }
    candidates["larger of the two Mahalanobis (shipped)"] = {
        name: torch.maximum(candidates["Mahalanobis, input statistics"][name], candidates["Mahalanobis, pooled features"][name])
        for name in groups}
    return candidates


def threshold_for(validation_scores: torch.Tensor) -> float:
    return float(torch.quantile(validation_scores, validation_pass_rate(len(validation_scores))))


def flagged_share(scores: torch.Tensor, threshold: float) -> float:
    return float((scores > threshold).float().mean())


def compare_domain_scores(predictor: Predictor, outputs: Callable[[list[Image.Image]], Outputs], splits: dict[str, FitData],
                          train_images: list[Image.Image], val_images: list[Image.Image],
                          photos: list[Image.Image] | None) -> SelectionSet:
    """The candidate out-of-domain scores on the validation lesions against the seed-SELECTION_SEED out-of-domain set,
    and the share of the rechecked lesion images (and full-size `photos`, where given) each flags at its threshold."""
    rng = np.random.default_rng(SELECTION_SEED)
    chosen = [val_images[i] for i in rng.choice(len(val_images), min(DAMAGED_LESIONS, len(val_images)), replace=False)]
    selection_set = [im for _, im in out_of_domain_set(chosen, SELECTION_SEED)]
    rechecked = {f"validation lesions, {source}": [SOURCES[source](im) for im in val_images] for source in RECHECKED_SOURCES}
    if photos:
        rechecked |= {"full-size photos": photos, "full-size photos, 1200x900, JPEG 90": [
            SOURCES["1200x900, JPEG 90"](im) for im in photos]}
    candidates = score_candidates(
        splits["train"], splits["val"], outputs(selection_set), {name: outputs(ims) for name, ims in rechecked.items()},
        {name: channel_statistics(predictor, ims) for name, ims in
         {"train": train_images, "val": val_images, "ood": selection_set, **rechecked}.items()})
    comparison = {name: {"auroc": auroc(scores["val"], scores["ood"]),
                         "flagged": flagged_share(scores["ood"], threshold_for(scores["val"])),
                         "lesions_flagged": {group: flagged_share(scores[group], threshold_for(scores["val"]))
                                             for group in rechecked}}
                  for name, scores in candidates.items()}
    return {"images": len(selection_set), "candidates": comparison,
            "lesion_images": {group: len(ims) for group, ims in rechecked.items()}}


def calibrate_checkpoint(weights: Path, train: list[Sample], val: list[Sample], test: list[Sample],
                         views: str = INFERENCE_VIEWS, bfloat16: bool = INFERENCE_BFLOAT16,
                         held_out_run: ScoredRun | None = None, photos: list[Image.Image] | None = None,
                         comparison: tuple[int, int] = (RESPLITS, OUT_OF_FOLD_DEALS)) -> CalibrationResult:
    """Fit the calibration of `weights` for running it with these test-time views and trunk dtype, store it
    (and the card's metrics) in the checkpoint; returns the report: {"calibration": what was fitted and how it
    does, "test": compute_metrics with calibrated probabilities} or, in its place, "held_out_run".

    For weights trained on the test split too (`test` empty), `held_out_run` is the calibrated report of the same
    recipe's run that held the test split out: the report then carries it under "held_out_run", in place of test
    figures these weights cannot have, and so does the checkpoint's card (marked so). `comparison`: the (resplits,
    deals) the calibrators are compared over (add_comparison_argument)."""
    if bool(test) == (held_out_run is not None):
        raise ValueError("calibrating needs exactly one of a test split to score and the report of a run that held it out")
    # Without an earlier fit: its outputs are raw, and a fit by an earlier version need not load.
    model, meta = load_checkpoint(weights)
    predictor = Predictor(model, meta["arch"], meta["image_size"], colour_constancy=meta["colour_constancy"])

    def outputs(images: list[Image.Image]) -> Outputs:
        # As this machine will serve it: a bfloat16 trunk only where the hardware has one.
        return image_outputs(predictor, images, views=views, bfloat16=bfloat16 and native_bfloat16(predictor.device.type))

    train_images, val_images = decode_samples(train), decode_samples(val)
    splits = {"train": fit_data(outputs(train_images), train), "val": fit_data(outputs(val_images), val)}
    calibration = dataclasses.replace(fit_calibration(splits["train"], splits["val"]), views=views, bfloat16=bfloat16)
    val_lesions = [s.lesion_id for s in val]
    sets, sets_report = choose_sets(calibration.probabilities(splits["val"].logits), splits["val"].labels, val_lesions)
    calibration = dataclasses.replace(calibration, sets=sets)
    resplits, deals = comparison
    shipped_out_of_fold, alternatives = compare_out_of_fold(splits["val"].logits, splits["val"].labels, val_lesions, deals)
    selection = compare_domain_scores(predictor, outputs, splits, train_images, val_images, photos)
    del train_images
    val_scores = calibration.domain_score(splits["val"].statistics, splits["val"].features)
    val_probabilities = calibration.probabilities(splits["val"].logits)
    report: CalibrationReport = {
        "views": views,
        "bfloat16": bfloat16,
        "temperatures": dict(zip(CLASS_CODES, calibration.temperatures, strict=True)),
        "validation_out_of_fold": shipped_out_of_fold,
        "validation_out_of_fold_alternatives": alternatives,
        "malignancy": {
            "threshold": calibration.malignancy_threshold,
            "validation_sensitivity": alert_rates(val_probabilities, splits["val"].labels, calibration)[0],
        },
        "out_of_domain": {
            "threshold": calibration.domain_threshold,
            "validation_lesions_flagged": flagged_share(val_scores, calibration.domain_threshold),
            "selection_set": selection,
        },
        "prediction_sets": sets_report,
    }
    if held_out_run is None:
        metrics = score_test_split(outputs, test, calibration, report, splits["val"], val_lesions, resplits)
        result = tested = {"calibration": report, "test": metrics}
    else:
        tested = {key: held_out_run[key] for key in HELD_OUT_KEYS}
        result = {"calibration": report, "held_out_run": tested}
    card = {**card_metrics(tested, report), **({"from_held_out_run": True} if held_out_run is not None else {})}
    add_to_checkpoint(weights, calibration=calibration.to_state(), card=json.loads(to_json(card)))
    return result


def score_test_split(outputs: Callable[[list[Image.Image]], Outputs], test: list[Sample], calibration: Calibration,
                     report: CalibrationReport, val: FitData, val_lesions: list[str], resplits: int) -> SplitMetrics:
    """Calibrated test metrics; the test figures of the calibration (before and after, the spread of the ECE over
    `resplits` resplits of the validation and test lesions, the alert, the out-of-domain check against the seed-1 set of
    damaged test lesions) are added to `report`."""
    test_images = decode_samples(test)
    test_data = fit_data(outputs(test_images), test)
    rng = np.random.default_rng(REPORT_SEED)
    chosen = [test_images[i] for i in rng.choice(len(test_images), min(DAMAGED_LESIONS, len(test_images)), replace=False)]
    report_set = out_of_domain_set(chosen, REPORT_SEED)
    ood = outputs([im for _, im in report_set])
    kinds = np.array([kind for kind, _ in report_set])
    test_scores = calibration.domain_score(test_data.statistics, test_data.features)
    ood_scores = calibration.domain_score(ood.statistics, ood.features)

    before = test_data.logits.softmax(1)
    after = calibration.probabilities(test_data.logits)
    metrics_before = compute_metrics(test_data.labels.numpy(), before.numpy())
    metrics = compute_metrics(test_data.labels.numpy(), after.numpy())
    report["test_before"] = {"nll": nll(before, test_data.labels), "ece": metrics_before["expected_calibration_error"]}
    report["test_after"] = {"nll": nll(after, test_data.labels), "ece": metrics["expected_calibration_error"],
                            "ece_if_calibrated": metrics["expected_calibration_error_if_calibrated"],
                            "mean_confidence": float(after.max(1).values.mean()),
                            "ece_resplits": compare_resplits(
                                torch.cat([val.logits, test_data.logits]), torch.cat([val.labels, test_data.labels]),
                                val_lesions + [s.lesion_id for s in test], len(set(val_lesions)), resplits)}
    report["malignancy"].update(zip(("test_sensitivity", "test_specificity"),
                                    alert_rates(after, test_data.labels, calibration), strict=True))
    report["malignancy"]["test_auc"] = metrics["malignant_auc"]
    report["test_after"]["reliability"] = reliability_bins(test_data.labels.numpy(), after.numpy())
    report["prediction_sets"]["test"] = sets_on_test(
        calibration.sets, report["prediction_sets"]["grouping"], calibration.probabilities(val.logits), val.labels,
        after, test_data.labels)
    report["out_of_domain"].update({
        "test_lesions_flagged": flagged_share(test_scores, calibration.domain_threshold),
        "report_set": {
            "images": len(report_set),
            "auroc": auroc(test_scores, ood_scores),
            "flagged": flagged_share(ood_scores, calibration.domain_threshold),
            "flagged_by_kind": {kind: flagged_share(ood_scores[torch.from_numpy(kinds == kind)], calibration.domain_threshold)
                                for kind in sorted(set(kinds))},
        },
    })
    return metrics


def alert_rates(probabilities: torch.Tensor, labels: torch.Tensor, calibration: Calibration) -> tuple[float, float]:
    """(sensitivity, specificity) of the malignancy alert."""
    alert = malignant_probability(probabilities) >= calibration.malignancy_threshold
    malignant = is_malignant(labels)
    sensitivity = float(alert[malignant].float().mean()) if malignant.any() else float("nan")
    specificity = float((~alert[~malignant]).float().mean()) if (~malignant).any() else float("nan")
    return sensitivity, specificity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="the HAM10000 folder training used")
    parser.add_argument("--type", choices=sorted(ARCHITECTURES), default="resnet34")
    parser.add_argument("--weights", type=Path, default=None, help="checkpoint to calibrate (default model_store/<type>.pt)")
    parser.add_argument("--json", type=Path, default=None,
                        help="training report to update with the calibration and calibrated test metrics "
                        "(default: <weights>.json when it exists)")
    parser.add_argument("--seed", type=int, default=0, help="the training run's split seed (its --split-seed, else --seed)")
    parser.add_argument("--views", choices=TTA_VIEWS, default=INFERENCE_VIEWS,
                        help="test-time views the checkpoint is served with (none: 1, flips: 4, dihedral: 8)")
    parser.add_argument("--bfloat16", action=argparse.BooleanOptionalAction, default=INFERENCE_BFLOAT16,
                        help="serve with a bfloat16 trunk where the hardware has it")
    parser.add_argument("--held-out", type=Path, default=None, metavar="REPORT",
                        help="for weights trained with --train-on-test: the calibrated report of the same recipe's run "
                        "that held the test split out, whose test figures the report and card carry (default: the one "
                        "already in the weights' report)")
    parser.add_argument("--photos", type=Path, default=None,
                        help="a folder of full-size HAM10000 photos with metadata.csv (../shared/data/ham10000-fullres) "
                        "to re-check the candidate out-of-domain scores on, as given and upscaled")
    add_comparison_argument(parser)
    args = parser.parse_args(argv)
    weights = args.weights or Path("model_store") / f"{args.type}.pt"
    report_path = args.json or weights.with_suffix(".json")
    try:
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        held_out_run = json.loads(args.held_out.read_text()) if args.held_out else report.get("held_out_run")
        if held_out_run is not None and not set(HELD_OUT_KEYS) <= set(held_out_run):
            source = args.held_out or f"{report_path}'s held_out_run"
            raise ValueError(f"{source} has no test figures: give the calibrated training report of a run "
                             "that held the test split out")
        if held_out_run is not None and "test" not in held_out_run["calibration"].get("prediction_sets", {}):
            raise ValueError(f"{args.held_out or report_path}: the held-out run has no prediction-set test figures; "
                             "calibrate that run again first (python -m training.calibrate ... --weights <its weights>)")
        train, val, test = split_dataset(args.root, args.seed, train_on_test=held_out_run is not None)
        photos = decode_samples(read_samples(args.photos)) if args.photos else None
        result = calibrate_checkpoint(weights, train, val, test, args.views, args.bfloat16, held_out_run, photos,
                                      args.comparison)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_calibration(result["calibration"]))
    if args.json or report_path.exists():
        report.pop("sources", None)  # measured with the calibration this replaces (python -m training.sources)
        if "held_out_run" in result:
            report.pop("test", None)
        report.update(result)
        report_path.write_text(to_json(report))
        print(f"wrote {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
