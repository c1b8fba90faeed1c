"""The JSON reports training writes, as types: model_store/<arch>.json is a CheckpointReport, its "calibration" a
CalibrationReport; the text `python -m training.calibrate` prints of one, and the test figures GET /model quotes.

TypedDicts rather than classes because the dicts are the public format (the reports on disk, GET /model's card):
the types name the keys for readers and type checkers while a report is still read and written as plain JSON, so
nothing converts it and nothing can drift between a class and the file.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from training.compare_calibrators import ECE_TARGET, OutOfFold, Resplit, calibrators_scored, shipped_resplit
from training.conformal import candidate_name, format_sets
from training.ood import REPORT_SEED, SELECTION_SEED


class EceFloor(TypedDict):
    """training.evaluate.calibration_error_floor: the ECE perfectly calibrated probabilities would measure."""
    mean: float
    p95: float


class FiguresBefore(TypedDict):
    """The test figures of the uncalibrated probabilities."""
    nll: float
    ece: float


class FiguresAfter(TypedDict):
    """The test figures of the calibrated probabilities."""
    nll: float
    ece: float
    ece_if_calibrated: EceFloor
    mean_confidence: float
    ece_resplits: dict[str, Resplit]  # by calibrator name, the shipped one first
    reliability: list[dict[str, float]]


class Malignancy(TypedDict):
    threshold: float
    validation_sensitivity: float
    test_sensitivity: NotRequired[float]
    test_specificity: NotRequired[float]
    test_auc: NotRequired[float]


class CandidateScore(TypedDict):
    auroc: float
    flagged: float
    lesions_flagged: dict[str, float]


class SelectionSet(TypedDict):
    images: int
    candidates: dict[str, CandidateScore]
    lesion_images: dict[str, int]


class ReportSet(TypedDict):
    images: int
    auroc: float
    flagged: float
    flagged_by_kind: dict[str, float]


class OutOfDomain(TypedDict):
    threshold: float
    validation_lesions_flagged: float
    selection_set: SelectionSet
    test_lesions_flagged: NotRequired[float]
    report_set: NotRequired[ReportSet]


class ClassCoverage(TypedDict):
    images: int
    coverage: float | None  # None: no image of the class was scored
    mean_size: float | None


class SetFigures(TypedDict):
    """training.conformal.set_figures at one level."""
    images: int
    coverage: float
    mean_size: float
    single_class: float
    melanoma_coverage: float | None
    malignant_coverage: float | None
    per_class: dict[str, ClassCoverage]


class SetsOnTest(TypedDict):
    levels: dict[str, SetFigures]
    curve: list[dict[str, float]]


class PredictionSets(TypedDict):
    """training.conformal.choose_sets's report, with sets_on_test's figures under "test" once scored."""
    score: str
    grouping: str
    groups: list[list[str]]
    thresholds: dict[str, dict[str, float]]
    validation_images: int
    validation_out_of_fold: dict[str, dict[str, SetFigures]]  # by candidate_name, then level
    folds: int
    deals: int
    test: NotRequired[SetsOnTest]


class CalibrationReport(TypedDict):
    """What training.calibrate fitted and how it does; the test_* keys only where a test split was scored."""
    views: str
    bfloat16: bool
    temperatures: dict[str, float]
    validation_out_of_fold: OutOfFold  # the shipped calibrator's
    validation_out_of_fold_alternatives: dict[str, OutOfFold]
    malignancy: Malignancy
    out_of_domain: OutOfDomain
    prediction_sets: PredictionSets
    test_before: NotRequired[FiguresBefore]
    test_after: NotRequired[FiguresAfter]


class ClassMetrics(TypedDict):
    precision: float
    recall: float
    f1: float
    auc: float
    support: int
    mean_confidence: float | None
    mean_probability: float


class SplitMetrics(TypedDict):
    """training.evaluate.compute_metrics (the keys the card reads; the JSON has more)."""
    n_images: int
    accuracy: float
    balanced_accuracy: float
    macro_auc: float
    melanoma_auc: float
    malignant_auc: float
    melanoma_sensitivity: float
    melanoma_specificity: float
    expected_calibration_error: float
    expected_calibration_error_if_calibrated: EceFloor
    malignant_calibration_error: float
    per_class: dict[str, ClassMetrics]


class ScoredRun(TypedDict):
    """A run with test figures: a checkpoint report, or the held-out run's part of one (HELD_OUT_KEYS)."""
    weights: str
    arguments: dict[str, Any]
    images: dict[str, int]
    saved_epoch: dict[str, float]
    test: SplitMetrics
    calibration: CalibrationReport


class CheckpointReport(TypedDict):
    """model_store/<arch>.json. Weights trained on the test split too have no "test" but a "held_out_run"."""
    model: str
    weights: str
    arguments: dict[str, Any]
    images: dict[str, int]
    saved_epoch: dict[str, float]
    calibration: CalibrationReport
    test: NotRequired[SplitMetrics]
    held_out_run: NotRequired[ScoredRun]
    training_seconds: NotRequired[float]
    history: NotRequired[list[dict[str, float]]]
    initial_weights: NotRequired[str]
    sources: NotRequired[dict[str, Any]]  # python -m training.sources --json


class CalibrationResult(TypedDict):
    """What training.calibrate.calibrate_checkpoint returns and writes into a CheckpointReport: the calibration and,
    depending on the weights, the test figures or those of the run that held the test split out."""
    calibration: CalibrationReport
    test: NotRequired[SplitMetrics]
    held_out_run: NotRequired[ScoredRun]


# What weights trained on the test split carry of the report of the run that held it out.
HELD_OUT_KEYS = tuple(ScoredRun.__annotations__)


def scored_report(report: CheckpointReport) -> ScoredRun:
    """The part of a shipped model's report that holds its test figures: the report itself or, for weights trained
    on the test split too, the report of the same recipe's run that held it out."""
    return report.get("held_out_run", report)


def card_metrics(tested: ScoredRun, own: CalibrationReport) -> dict[str, Any]:
    """The test figures GET /model quotes, from a report's "test" and "calibration"; the prediction sets' fit and
    validation figures from `own`, the calibration report of the weights themselves."""
    metrics, calibration = tested["test"], tested["calibration"]
    sets = own["prediction_sets"]
    chosen = sets["validation_out_of_fold"][candidate_name(sets["score"], sets["grouping"])]
    return {
        "test_images": metrics["n_images"],
        **{key: metrics[key] for key in ("accuracy", "balanced_accuracy", "macro_auc", "melanoma_auc",
                                         "melanoma_sensitivity", "melanoma_specificity", "expected_calibration_error")},
        "malignancy_sensitivity": calibration["malignancy"]["test_sensitivity"],
        "malignancy_specificity": calibration["malignancy"]["test_specificity"],
        "out_of_domain_auroc": calibration["out_of_domain"]["report_set"]["auroc"],
        "test_lesions_flagged_out_of_domain": calibration["out_of_domain"]["test_lesions_flagged"],
        "prediction_sets": {"score": sets["score"], "grouping": sets["grouping"],
                            "test": calibration["prediction_sets"]["test"]["levels"],
                            "validation_out_of_fold": chosen},
    }


def floor_text(floor: EceFloor) -> str:
    return f"{floor['mean']:.4f}, 95% below {floor['p95']:.4f}"


def tested_lines(report: CalibrationReport) -> list[str]:
    """The calibration's figures before and after on the test split, and the spread of the ECE over resplits."""
    before, after = report["test_before"], report["test_after"]
    return [f"test NLL               {before['nll']:.4f} -> {after['nll']:.4f}",
            f"test ECE (15 bins)     {before['ece']:.4f} -> {after['ece']:.4f} "
            f"(perfectly calibrated: {floor_text(after['ece_if_calibrated'])})",
            f"test ECE over {shipped_resplit(report)['draws']} lesion-grouped resplits of validation + test: mean, 90% range, "
            f"share <= {ECE_TARGET}",
            *(f"  {name:<54} {m['mean']:.4f}  {m['p5']:.4f}-{m['p95']:.4f}  {m['share_at_target']:.3f}"
              for name, m in after["ece_resplits"].items())]


def calibrator_lines(report: CalibrationReport) -> list[str]:
    """The shipped calibrator's out-of-fold ECE, and every compared calibrator's out-of-fold figures."""
    shipped = report["validation_out_of_fold"]
    return [
        f"validation ECE, out of fold ({shipped['folds']} lesion groups, {shipped['deals']} deals) "
        f"{shipped['ece']:.4f} (perfectly calibrated: {floor_text(shipped['ece_if_calibrated'])})",
        "calibrators, out of fold on validation: NLL, ECE, P(malignant) ECE, mean P(malignant) / malignant share, "
        "accuracy, balanced accuracy, macro AUC",
        *(f"  {name:<54} {m['nll']:.4f}  {m['ece']:.4f}  {m['malignant_ece']:.4f}  {m['mean_malignant_probability']:.3f} / "
          f"{m['malignant_share']:.3f}  {m['accuracy']:.4f}  {m['balanced_accuracy']:.4f}  {m['macro_auc']:.4f}"
          for name, m in calibrators_scored(report).items()),
    ]


def domain_lines(ood: OutOfDomain, tested: bool) -> list[str]:
    """The out-of-domain check: its threshold, the report set (where tested) and the candidate scores."""
    selection = ood["selection_set"]
    return [
        f"out-of-domain threshold {ood['threshold']:.3f}: validation lesions flagged {ood['validation_lesions_flagged']:.3f}"
        + (f", test lesions flagged {ood['test_lesions_flagged']:.3f}" if tested else ""),
        *([f"out-of-domain set ({ood['report_set']['images']} images, seed {REPORT_SEED}): AUROC "
           f"{ood['report_set']['auroc']:.4f}, flagged {ood['report_set']['flagged']:.3f}",
           *(f"  {kind:<22} flagged {share:.3f}" for kind, share in ood["report_set"]["flagged_by_kind"].items())]
          if tested else []),
        f"candidate scores (validation lesions vs the seed-{SELECTION_SEED} set, {selection['images']} images):",
        *(f"  {name:<42} AUROC {m['auroc']:.4f}  flagged {m['flagged']:.3f}" for name, m in selection["candidates"].items()),
        "share of other lesion images flagged at each candidate's threshold: "
        + "; ".join(f"({i}) {group} ({count})" for i, (group, count) in enumerate(selection["lesion_images"].items(), 1)),
        *(f"  {name:<42} " + "  ".join(f"({i}) {share:.3f}" for i, share in enumerate(m["lesions_flagged"].values(), 1))
          for name, m in selection["candidates"].items()),
    ]


def format_calibration(report: CalibrationReport) -> str:
    """The calibration report as text; its test lines only where it has test figures (not for weights trained
    on the test split)."""
    tested = "test_after" in report
    malignancy = report["malignancy"]
    lines = [
        f"fitted for             test-time views {report['views']}, {'bfloat16' if report['bfloat16'] else 'float32'} trunk",
        "temperatures by predicted class " + ", ".join(f"{code} {t:.3f}" for code, t in report["temperatures"].items()),
        *(tested_lines(report) if tested else []),
        *calibrator_lines(report),
        f"malignancy threshold   {malignancy['threshold']:.4f} (validation sensitivity "
        f"{malignancy['validation_sensitivity']:.3f})",
        *([f"malignancy, test       sensitivity {malignancy['test_sensitivity']:.3f}, specificity "
           f"{malignancy['test_specificity']:.3f}, AUC {malignancy['test_auc']:.4f}"] if tested else []),
        *domain_lines(report["out_of_domain"], tested),
        *format_sets(report["prediction_sets"]),
        *([] if tested else ["no test figures: these weights were trained on the test split too"]),
    ]
    return "\n".join(lines)
