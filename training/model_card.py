"""Write MODEL_CARD.md from the shipped models' reports (model_store/<arch>.json), so its numbers are the weights'.

    python -m training.model_card [--store model_store] [--out MODEL_CARD.md]

Rerun after training or `python -m training.calibrate`; a test fails when the committed card differs. The prose and
layout are training/card_templates/card.md (string.Template); this module computes the values and tables it names.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from string import Template

from skinlesion.calibration import MALIGNANT_CODES
from skinlesion.model import ARCHITECTURES, CLASSES
from skinlesion.options import COVERAGE_LEVELS, DEFAULT_COVERAGE
from training.compare_calibrators import CALIBRATOR_FIGURES, ECE_TARGET, calibrators_scored, shipped_resplit
from training.conformal import candidate_name
from training.fitting import CLASS_TEMPERATURE_PRIOR_IMAGES, IN_DOMAIN_PASS_RATE, MALIGNANCY_SENSITIVITY
from training.plots import plot_reliability, plot_set_curves
from training.reports import CalibrationReport, CheckpointReport, ScoredRun, SplitMetrics, scored_report

# The card's prose and layout: card.md, with the optional paragraphs and repeated lines in files of their own.
TEMPLATES = Path(__file__).with_name("card_templates")
CITATION = (
    "Tschandl, P., Rosendahl, C. & Kittler, H. The HAM10000 dataset, a large collection of multi-source "
    "dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018), doi:10.1038/sdata.2018.161"
)
SUMMARY_METRICS = (
    ("accuracy", "accuracy"),
    ("balanced accuracy", "balanced_accuracy"),
    ("macro ROC AUC (one vs rest)", "macro_auc"),
    ("melanoma ROC AUC", "melanoma_auc"),
    ("melanoma recall (sensitivity)", "melanoma_sensitivity"),
    ("melanoma specificity", "melanoma_specificity"),
    ("malignant vs benign ROC AUC", "malignant_auc"),
    ("expected calibration error (15 bins)", "expected_calibration_error"),
)
# One figure of a calibration report, formatted: a table cell.
Cell = Callable[[CalibrationReport], str]


def fill(name: str, **values: object) -> str:
    """The template card_templates/<name>.md with these values, without its final newline (where it is placed
    decides what follows it)."""
    return Template((TEMPLATES / f"{name}.md").read_text()).substitute(values).removesuffix("\n")


def between_paragraphs(text: str | None) -> str:
    """An optional paragraph for a placeholder on a line of its own between two paragraphs: with a blank line
    on each side, or (None) nothing, leaving the one blank line."""
    return "" if text is None else f"\n{text}\n"


def mean_malignant_probability(metrics: SplitMetrics) -> float:
    return sum(metrics["per_class"][code]["mean_probability"] for code in MALIGNANT_CODES)


def malignant_share(metrics: SplitMetrics) -> float:
    return sum(metrics["per_class"][code]["support"] for code in MALIGNANT_CODES) / metrics["n_images"]


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def row(name: str, cell: Cell, calibrations: dict[str, CalibrationReport]) -> list[str]:
    """A table row: `cell` of each model's calibration report."""
    return [name, *(cell(c) for c in calibrations.values())]


def render(reports: dict[str, CheckpointReport]) -> str:
    """MODEL_CARD.md for these models' reports: figures on the test split from scored_report (the held-out run's,
    for weights trained on the test split too), fitted values and validation figures from the weights' own."""
    tested = {a: scored_report(r) for a, r in reports.items()}
    card = fill("card", **intro_values(reports, tested), **metric_values(tested),
                **calibration_values(reports, tested), **domain_values(reports, tested),
                **prediction_set_values(reports, tested), **limit_values(tested), photo_sizes=photo_sizes(reports))
    return card + "\n"


def intro_values(reports: dict[str, CheckpointReport], tested: dict[str, ScoredRun]) -> dict[str, str]:
    """The title, the data and the training recipe."""
    images = next(iter(tested.values()))["images"]
    trained_on_test = [a for a, r in reports.items() if "held_out_run" in r]
    shipped_weights = [fill("shipped_weights", arch=a, images=f"{reports[a]['images']['train']:,}",
                            accuracy=f"{reports[a]['saved_epoch']['val_accuracy']:.3f}",
                            balanced_accuracy=f"{reports[a]['saved_epoch']['val_balanced_accuracy']:.3f}",
                            held_out_accuracy=f"{tested[a]['saved_epoch']['val_accuracy']:.3f}",
                            held_out_balanced_accuracy=f"{tested[a]['saved_epoch']['val_balanced_accuracy']:.3f}")
                       for a in trained_on_test]
    return {
        "archs": ", ".join(reports),
        "trained_on_test": between_paragraphs(
            fill("trained_on_test", archs=", ".join(trained_on_test)) if trained_on_test else None),
        "citation": CITATION,
        "images_total": f"{sum(images.values()):,}",
        **{f"images_{split}": f"{images[split]:,}" for split in ("train", "validation", "test")},
        "shipped_weights": "".join(line + "\n" for line in shipped_weights),
        "classes": "; ".join(f"`{c.code}` {c.name}" for c in CLASSES),
        "recipe": "\n".join(recipe_line(arch, report) for arch, report in reports.items()),
    }


def recipe_line(arch: str, report: CheckpointReport) -> str:
    a = report["arguments"]
    teachers = a.get("teacher") or []
    return fill(
        "recipe", arch=arch, epochs=a["epochs"], input=f"{a['image_size'][0]}x{a['image_size'][1]}",
        batch_size=a["batch_size"], lr=a["lr"], weight_decay=a["weight_decay"], seed=a["seed"],
        start={"none": "from scratch,", "imagenet": "from ImageNet weights,"}.get(
            a["weights"], f"continued from {report.get('initial_weights') or a['weights']}; then"),
        ema=f", EMA of the weights (decay {a['ema']})" if a["ema"] else "",
        distillation=(f", distilled from {len(teachers)} teachers (weight {a['distill_weight']}, temperature "
                      f"{a['distill_temperature']})" if teachers else ""),
        selection="best by validation balanced accuracy" if a["select"] == "best" else "the final one",
        epoch=report["saved_epoch"]["epoch"])


def metric_values(tested: dict[str, ScoredRun]) -> dict[str, str]:
    """The Test metrics section: the summary table and each model's per-class table."""
    test = {a: r["test"] for a, r in tested.items()}
    return {
        "summary_table": table(["metric", *test],
                               [[name, *(f"{m[key]:.3f}" for m in test.values())] for name, key in SUMMARY_METRICS]),
        "per_class_tables": "\n\n".join(f"Per class, {a}:\n\n" + per_class_table(m) for a, m in test.items()),
    }


def per_class_table(metrics: SplitMetrics) -> str:
    return table(["class", "precision", "mean confidence when predicted", "recall", "ROC AUC", "test images", "share",
                  "mean probability"],
                 [[f"`{code}`", f"{m['precision']:.3f}",
                   "-" if m["mean_confidence"] is None else f"{m['mean_confidence']:.3f}", f"{m['recall']:.3f}",
                   f"{m['auc']:.3f}", str(m["support"]), f"{m['support'] / metrics['n_images']:.3f}",
                   f"{m['mean_probability']:.3f}"]
                  for code, m in metrics["per_class"].items()])


def calibration_values(reports: dict[str, CheckpointReport], tested: dict[str, ScoredRun]) -> dict[str, str]:
    """The Calibration section: the fitted temperatures and their test figures, and the calibrators compared."""
    own = {a: r["calibration"] for a, r in reports.items()}
    test_calibration = {a: r["calibration"] for a, r in tested.items()}
    test = {a: r["test"] for a, r in tested.items()}
    calibration_table = table(["", *reports], [
        row("test-time views, trunk", lambda c: f"{c.get('views', 'none')}, {'bfloat16' if c.get('bfloat16') else 'float32'}",
            own),
        row("temperatures by predicted class (" + ", ".join(c.code for c in CLASSES) + ")",
            lambda c: ", ".join(f"{t:.2f}" for t in c["temperatures"].values()), own),
        row("test NLL before -> after", lambda c: f"{c['test_before']['nll']:.3f} -> {c['test_after']['nll']:.3f}",
            test_calibration),
        row("test ECE before -> after", lambda c: f"{c['test_before']['ece']:.3f} -> {c['test_after']['ece']:.3f}",
            test_calibration),
        row("test ECE a perfectly calibrated model would measure (mean, 95th percentile)",
            lambda c: f"{c['test_after']['ece_if_calibrated']['mean']:.3f}, {c['test_after']['ece_if_calibrated']['p95']:.3f}",
            test_calibration),
        row("test ECE if the split were drawn again: mean (90% range) over lesion-grouped resplits of validation + test",
            lambda c: f"{shipped_resplit(c)['mean']:.3f} ({shipped_resplit(c)['p5']:.3f}-{shipped_resplit(c)['p95']:.3f})",
            test_calibration),
        row(f"share of those resplits with ECE <= {ECE_TARGET}",
            lambda c: f"{shipped_resplit(c)['share_at_target']:.2f}", test_calibration),
        row("validation ECE, each lesion scored with temperatures fitted without it",
            lambda c: f"{c['validation_out_of_fold']['ece']:.3f}", own),
        ["test P(malignant) ECE (15 bins of P(malignant))", *(f"{m['malignant_calibration_error']:.3f}" for m in test.values())],
        ["test mean P(malignant) / share of malignant lesions",
         *(f"{mean_malignant_probability(m):.3f} / {malignant_share(m):.3f}" for m in test.values())],
    ])
    return {"prior_images": str(CLASS_TEMPERATURE_PRIOR_IMAGES), "calibration_table": calibration_table,
            **calibrator_values(own)}


def calibrator_values(own: dict[str, CalibrationReport]) -> dict[str, str]:
    """The calibrators compared out of fold, and why the one with a class bias does not ship where it gives up
    balanced accuracy for every model."""
    scored = {a: calibrators_scored(c) for a, c in own.items()}
    names = list(next(iter(scored.values())))
    shipped, with_bias = names[0], "one temperature and class bias"
    bias_costs = with_bias in names and all(s[with_bias]["balanced_accuracy"] < s[shipped]["balanced_accuracy"]
                                            for s in scored.values())
    return {
        "calibrators_table": table(["calibrator (validation, out of fold)", "model", "NLL", "ECE", "P(malignant) ECE",
                                    "accuracy", "balanced accuracy", "macro AUC"],
                                   [[name, a, *(f"{s[name][key]:.3f}" for key in CALIBRATOR_FIGURES)]
                                    for name in names for a, s in scored.items()]),
        "bias_not_shipped": between_paragraphs(fill("bias_not_shipped") if bias_costs else None),
    }


def domain_values(reports: dict[str, CheckpointReport], tested: dict[str, ScoredRun]) -> dict[str, str]:
    """The Operating points (the malignancy alert and out-of-domain thresholds) and Out-of-domain behaviour sections."""
    own = {a: r["calibration"] for a, r in reports.items()}
    test_calibration = {a: r["calibration"] for a, r in tested.items()}
    report_set = next(iter(test_calibration.values()))["out_of_domain"]["report_set"]
    operating_table = table(["", *reports], [
        row("malignancy threshold", lambda c: f"{c['malignancy']['threshold']:.3f}", own),
        row("test sensitivity / specificity",
            lambda c: f"{c['malignancy']['test_sensitivity']:.3f} / {c['malignancy']['test_specificity']:.3f}",
            test_calibration),
        row("malignant vs benign test AUC", lambda c: f"{c['malignancy']['test_auc']:.3f}", test_calibration),
        row("domain-score threshold", lambda c: f"{c['out_of_domain']['threshold']:.3f}", own),
        row("validation lesions flagged", lambda c: f"{c['out_of_domain']['validation_lesions_flagged']:.3f}", own),
        row("test lesions flagged", lambda c: f"{c['out_of_domain']['test_lesions_flagged']:.3f}", test_calibration),
    ])
    out_of_domain_table = table(["", *reports], [
        row("AUROC", lambda c: f"{c['out_of_domain']['report_set']['auroc']:.4f}", test_calibration),
        row("flagged at the threshold", lambda c: f"{c['out_of_domain']['report_set']['flagged']:.3f}", test_calibration),
        *(row(f"flagged: {kind}", lambda c, kind=kind: f"{c['out_of_domain']['report_set']['flagged_by_kind'][kind]:.2f}",
              test_calibration)
          for kind in report_set["flagged_by_kind"]),
    ])
    return {"malignant_codes": " + ".join(MALIGNANT_CODES), "malignancy_sensitivity": f"{MALIGNANCY_SENSITIVITY:.2f}",
            "in_domain_pass_rate": f"{IN_DOMAIN_PASS_RATE:.0%}", "operating_table": operating_table,
            "report_set_images": str(report_set["images"]), "out_of_domain_table": out_of_domain_table}


def prediction_set_values(reports: dict[str, CheckpointReport], tested: dict[str, ScoredRun]) -> dict[str, str]:
    """The Prediction sets section: the shipped sets' fit (the weights' own) and their figures on the test split."""
    own = {a: r["calibration"]["prediction_sets"] for a, r in reports.items()}
    rows = []
    for a, sets in own.items():
        validation = sets["validation_out_of_fold"][candidate_name(sets["score"], sets["grouping"])]
        for level, f in tested[a]["calibration"]["prediction_sets"]["test"]["levels"].items():
            v = validation[level]
            rows.append([a, level, f"{f['coverage']:.3f}", f"{f['melanoma_coverage']:.3f}", f"{f['malignant_coverage']:.3f}",
                         f"{f['mean_size']:.2f}", f"{f['single_class']:.2f}", f"{v['coverage']:.3f} / {v['mean_size']:.2f}"])
    return {
        "coverage_levels": ", ".join(map(str, COVERAGE_LEVELS)),
        "default_coverage": str(DEFAULT_COVERAGE),
        "set_groups": "; ".join(", ".join(group) for group in next(iter(own.values()))["groups"]),
        "set_choices": "; ".join(f"{a} `{sets['score']}` by {sets['grouping']}" for a, sets in own.items()),
        "sets_table": table(["model", "level", "test coverage", "melanoma", "malignant", "mean size", "single class",
                             "validation, out of fold: coverage / mean size"], rows),
        "sets_per_class_tables": "\n\n".join(
            f"Per true class on the test split, {a}: coverage / mean set size at each level\n\n" + set_class_table(r)
            for a, r in tested.items()),
    }


def set_class_table(run: ScoredRun) -> str:
    """Coverage / mean set size per true class at each level, on the test split."""
    per_class = {level: f["per_class"] for level, f in run["calibration"]["prediction_sets"]["test"]["levels"].items()}
    first = next(iter(per_class.values()))
    return table(["class", "test images", *per_class],
                 [[f"`{code}`", str(first[code]["images"]),
                   *(f"{per_class[level][code]['coverage']:.3f} / {per_class[level][code]['mean_size']:.2f}"
                     if per_class[level][code]["coverage"] is not None else "-" for level in per_class)]
                  for code in first])


def photo_sizes(reports: dict[str, CheckpointReport]) -> str:
    """The Photo sizes section, where some report has `python -m training.sources --json`'s table."""
    sources = {a: r["sources"] for a, r in reports.items() if "sources" in r}
    if not sources:
        return between_paragraphs(None)
    first = next(iter(sources.values()))
    groups = list(first["table"])
    rows = [[name, *(" / ".join(f"{sources[a]['table'][g][name]['flagged']:.3f}" for g in groups) for a in sources),
             " / ".join(f"{sources[a]['table'][groups[0]][name]['same_label']:.3f}" for a in sources)]
            for name in first["table"][groups[0]]]
    return between_paragraphs(fill(
        "photo_sizes", groups="; ".join(f"{group} ({count})" for group, count in first["images"].items()),
        every=first["every"], table=table(["source", *(f"{a}: flagged" for a in sources), "same label"], rows)))


def limit_values(tested: dict[str, ScoredRun]) -> dict[str, str]:
    """The Known limits section's figures (test figures and validation figures of the runs that have them)."""
    test = {a: r["test"] for a, r in tested.items()}
    calibration = {a: r["calibration"] for a, r in tested.items()}
    return {
        "melanoma_recall": " and ".join(f"{m['melanoma_sensitivity']:.2f}" for m in test.values()),
        "arch_list": ", ".join(tested),
        "test_lesions_flagged": f"{max(c['out_of_domain']['test_lesions_flagged'] for c in calibration.values()):.1%}",
        "out_of_fold_ece": " and ".join(f"{c['validation_out_of_fold']['ece']:.3f}" for c in calibration.values()),
        "test_ece": " and ".join(f"{c['test_after']['ece']:.3f}" for c in calibration.values()),
        "ece_target": str(ECE_TARGET),
        "ece_floor": f"{max(c['test_after']['ece_if_calibrated']['p95'] for c in calibration.values()):.3f}",
        "resplit_low": f"{min(shipped_resplit(c)['p5'] for c in calibration.values()):.3f}",
        "resplit_high": f"{max(shipped_resplit(c)['p95'] for c in calibration.values()):.3f}",
        "confidence_limits": "\n".join(confidence_limit_lines(test, calibration)),
    }


def confidence_limit_lines(test: dict[str, SplitMetrics], calibration: dict[str, CalibrationReport]) -> list[str]:
    """Accuracy at the stated confidence on validation and test, and the two limits that follow where they hold for
    every model: validation lesions easier than test ones, and probabilities leaning towards the rarer classes."""
    shift = [f"{a}: {c['validation_out_of_fold']['accuracy']:.3f} at {c['validation_out_of_fold']['mean_confidence']:.3f} "
             f"on validation, {test[a]['accuracy']:.3f} at {c['test_after']['mean_confidence']:.3f} on test"
             for a, c in calibration.items()]
    lines = [f"  {line}{';' if i < len(shift) - 1 else '.'}" for i, line in enumerate(shift)]
    if all(calibration[a]["validation_out_of_fold"]["accuracy"] > m["accuracy"] for a, m in test.items()):
        lines.append(fill("validation_easier"))
    if all(mean_malignant_probability(m) > malignant_share(m) for m in test.values()):
        lines.append(fill("rarer_classes",
                          mean_malignant_probability=" and ".join(f"{mean_malignant_probability(m):.3f}" for m in test.values()),
                          malignant_share=f"{malignant_share(next(iter(test.values()))):.3f}"))
    return lines


def plot_card_figures(reports: dict[str, CheckpointReport], store: Path) -> None:
    """The pictures beside the card: coverage and mean set size against the level, and the reliability diagram of
    the calibrated probabilities, on the test split (the held-out run's, for weights trained on it)."""
    tested = {a: scored_report(r)["calibration"] for a, r in reports.items()}
    plot_set_curves({a: c["prediction_sets"]["test"]["curve"] for a, c in tested.items()}, store / "prediction_sets.png")
    plot_reliability({a: c["test_after"]["reliability"] for a, c in tested.items()}, store / "reliability.png")


def read_reports(store: Path) -> dict[str, CheckpointReport]:
    reports = {arch: json.loads((store / f"{arch}.json").read_text()) for arch in sorted(ARCHITECTURES)
               if (store / f"{arch}.json").exists()}
    if not reports:
        raise FileNotFoundError(f"no model reports (<arch>.json) in {store}")
    for arch, report in reports.items():
        if "calibration" not in report or "test" not in scored_report(report):
            raise ValueError(f"{store / arch}.json has no calibration: run python -m training.calibrate first")
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.model_card", description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"), help="folder with <arch>.json reports")
    parser.add_argument("--out", type=Path, default=Path("MODEL_CARD.md"))
    args = parser.parse_args(argv)
    try:
        reports = read_reports(args.store)
        text = render(reports)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(text)
    plot_card_figures(reports, args.store)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
