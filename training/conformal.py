"""Conformal prediction sets: which diagnoses remain plausible for a photo, with a stated coverage.

Split conformal prediction (Vovk et al. 2005; Angelopoulos & Bates 2021): on the validation lesions, the score of
each image's true class under the calibrated probabilities; a class joins a new image's set when its score is no
higher than the ceil((n + 1) * level)-th smallest of those n scores. Sets then hold the true class of at least
`level` of new images drawn like the validation ones, whatever the model: a guarantee on average over such photos,
not for any one photo, and none for photos unlike them (the service gives an out-of-domain photo every class).

Mondrian (label-conditional) calibration takes that quantile separately within groups of true classes, so that
coverage holds within each group: melanoma alone, the other malignant classes (basal cell carcinoma, actinic
keratoses) and the benign ones. A group's guarantee needs enough validation images in it: df and vasc have about a
dozen each, too few for a group of their own at 95% (the set would hold them always), so they share the benign one
and their own coverage is not guaranteed. The score and the grouping are chosen on the validation lesions, out of
fold, by mean set size at DEFAULT_COVERAGE among the groupings that guarantee melanoma and the malignant classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from skinlesion.calibration import MALIGNANT_CODES, SET_SCORES, SetFit, is_malignant, set_scores
from skinlesion.model import CLASS_CODES
from skinlesion.options import COVERAGE_LEVELS, DEFAULT_COVERAGE
from training.data import lesion_folds

MELANOMA = CLASS_CODES.index("mel")
# Groups of true classes whose coverage is calibrated separately (class codes); each class in exactly one.
GROUPINGS: dict[str, tuple[tuple[str, ...], ...]] = {
    "marginal": (CLASS_CODES,),
    "melanoma, other malignant, benign": (("mel",), tuple(c for c in MALIGNANT_CODES if c != "mel"),
                                          tuple(c for c in CLASS_CODES if c not in MALIGNANT_CODES)),
    "per class": tuple((c,) for c in CLASS_CODES),
}
# Groupings whose guarantee covers melanoma on its own and the malignant classes together: the ones a set may ship with.
GUARANTEEING = ("melanoma, other malignant, benign", "per class")
# Lesion-grouped folds and deals of the validation split behind the out-of-fold comparison.
FOLDS, DEALS = 5, 20
# Levels the coverage / set size curve is drawn at (fitted on validation, measured on test).
CURVE_LEVELS = tuple(round(x, 2) for x in np.arange(0.5, 0.96, 0.05)) + (0.97, 0.99)


def conformal_quantile(scores: torch.Tensor, level: float) -> float:
    """The ceil((n + 1) * level)-th smallest of n scores; inf when that exceeds n (the level needs more images)."""
    rank = math.ceil((len(scores) + 1) * level)
    return float(scores.double().sort().values[rank - 1]) if rank <= len(scores) else math.inf


def fit_thresholds(probabilities: torch.Tensor, labels: torch.Tensor, score: str, grouping: str,
                   level: float) -> tuple[float, ...]:
    """One threshold per class: the conformal quantile of the true-class scores of the images whose class is in its
    group."""
    true_scores = set_scores(probabilities, score).gather(1, labels.long()[:, None]).squeeze(1)
    thresholds = [math.inf] * len(CLASS_CODES)
    for group in GROUPINGS[grouping]:
        members = [CLASS_CODES.index(c) for c in group]
        quantile = conformal_quantile(true_scores[torch.isin(labels, torch.tensor(members))], level)
        for k in members:
            thresholds[k] = quantile
    return tuple(thresholds)


def fit_sets(probabilities: torch.Tensor, labels: torch.Tensor, score: str, grouping: str,
             levels: tuple[float, ...] = COVERAGE_LEVELS) -> SetFit:
    return SetFit(score, {level: fit_thresholds(probabilities, labels, score, grouping, level) for level in levels})


def set_figures(members: torch.Tensor, labels: torch.Tensor) -> dict:
    """Coverage (share of images whose set holds the true class) and mean set size: overall, for melanoma, for the
    malignant classes together and per true class (None where the class is absent); the share of single-class sets."""
    covered = members.gather(1, labels.long()[:, None]).squeeze(1).double()
    sizes = members.sum(1).double()

    def mean(values: torch.Tensor, where: torch.Tensor) -> float | None:
        return float(values[where].mean()) if where.any() else None

    return {
        "images": len(labels),
        "coverage": float(covered.mean()),
        "mean_size": float(sizes.mean()),
        "single_class": float((sizes == 1).double().mean()),
        "melanoma_coverage": mean(covered, labels == MELANOMA),
        "malignant_coverage": mean(covered, is_malignant(labels)),
        "per_class": {code: {"images": int((labels == k).sum()), "coverage": mean(covered, labels == k),
                             "mean_size": mean(sizes, labels == k)} for k, code in enumerate(CLASS_CODES)},
    }


def out_of_fold_figures(probabilities: torch.Tensor, labels: torch.Tensor, lesions: list[str], score: str,
                        grouping: str, levels: tuple[float, ...] = COVERAGE_LEVELS, folds: int = FOLDS,
                        deals: int = DEALS) -> dict[float, dict]:
    """set_figures at each level for sets fitted on the other folds of the validation lesions, averaged over deals:
    what the fit gives new lesions like the validation ones."""
    runs: dict[float, list[dict]] = {level: [] for level in levels}
    for seed in range(deals):
        groups = lesion_folds(lesions, folds, seed)
        members = {level: torch.zeros(probabilities.shape, dtype=torch.bool) for level in levels}
        for fold in range(folds):
            held_out = groups == fold
            fit = fit_sets(probabilities[~held_out], labels[~held_out], score, grouping, levels)
            for level in levels:
                members[level][held_out] = fit.members(probabilities[held_out], level)
        for level in levels:
            runs[level].append(set_figures(members[level], labels))
    return {level: averaged(figures) for level, figures in runs.items()}


def averaged(figures: list[dict]) -> dict:
    """The element-wise mean of equally shaped figure dicts (None where any is None)."""
    first = figures[0]
    if isinstance(first, dict):
        return {key: averaged([f[key] for f in figures]) for key in first}
    if any(f is None for f in figures):
        return None
    return float(np.mean(figures)) if isinstance(first, float) else first


def candidate_name(score: str, grouping: str) -> str:
    return f"{score}, {grouping}"


def choose_sets(probabilities: torch.Tensor, labels: torch.Tensor, lesions: list[str]) -> tuple[SetFit, dict]:
    """The prediction sets to ship, fitted on all these (validation) images, and the report of the choice: every
    score and grouping out of fold, the chosen one (smallest mean set size at DEFAULT_COVERAGE among GUARANTEEING
    groupings) and its fitted thresholds."""
    candidates = {candidate_name(score, grouping): out_of_fold_figures(probabilities, labels, lesions, score, grouping)
                  for score in SET_SCORES for grouping in GROUPINGS}
    score, grouping = min(((s, g) for s in SET_SCORES for g in GUARANTEEING),
                          key=lambda c: candidates[candidate_name(*c)][DEFAULT_COVERAGE]["mean_size"])
    fit = fit_sets(probabilities, labels, score, grouping)
    report = {
        "score": score,
        "grouping": grouping,
        "groups": [list(group) for group in GROUPINGS[grouping]],
        "thresholds": {str(level): dict(zip(CLASS_CODES, t, strict=True)) for level, t in fit.thresholds.items()},
        "validation_images": len(labels),
        "validation_out_of_fold": {name: {str(level): f for level, f in figures.items()}
                                   for name, figures in candidates.items()},
        "folds": FOLDS,
        "deals": DEALS,
    }
    return fit, report


def sets_on_test(fit: SetFit, grouping: str, val_probabilities: torch.Tensor, val_labels: torch.Tensor,
                 test_probabilities: torch.Tensor, test_labels: torch.Tensor) -> dict:
    """The shipped sets on the test split at each served level, and the coverage / size curve over CURVE_LEVELS
    (each level fitted on the validation images with the same score and grouping)."""
    curve = fit_sets(val_probabilities, val_labels, fit.score, grouping, CURVE_LEVELS)
    return {
        "levels": {str(level): set_figures(fit.members(test_probabilities, level), test_labels) for level in fit.thresholds},
        "curve": [{"level": level, **{key: value for key, value in
                                      set_figures(curve.members(test_probabilities, level), test_labels).items()
                                      if key != "per_class"}} for level in CURVE_LEVELS],
    }


def share(value: float | None) -> str:
    """A coverage to 3 decimals; "-" where no image of that kind was scored."""
    return "-" if value is None else f"{value:.3f}"


def format_sets(report: dict) -> list[str]:
    """The prediction-set part of a calibration report as text lines."""
    lines = [f"prediction sets: score {report['score']}, grouping {report['grouping']} (chosen out of fold on "
             f"{report['validation_images']} validation images by mean size at {DEFAULT_COVERAGE})",
             "  candidates out of fold on validation, per level: coverage / melanoma / malignant coverage, mean size"]
    for name, figures in report["validation_out_of_fold"].items():
        lines.append(f"    {name:<42} " + "  ".join(
            f"{level}: {f['coverage']:.3f}/{share(f['melanoma_coverage'])}/{share(f['malignant_coverage'])} {f['mean_size']:.2f}"
            for level, f in figures.items()))
    for level, f in report.get("test", {}).get("levels", {}).items():
        lines.append(f"  test at {level}: coverage {f['coverage']:.3f}, melanoma {share(f['melanoma_coverage'])}, malignant "
                     f"{share(f['malignant_coverage'])}, mean size {f['mean_size']:.2f}, single class {f['single_class']:.3f}")
    return lines
