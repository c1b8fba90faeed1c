"""The committed weights are real trained models: they load as served, beat the majority baseline, carry the
calibration their report describes, and MODEL_CARD.md is generated from those reports."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from skinlesion.image import decode_image
from skinlesion.model import ARCHITECTURES, DEFAULT_IMAGE_SIZE
from skinlesion.options import COVERAGE_LEVELS, DEFAULT_COVERAGE
from skinlesion.predictor import Outputs, Predictor
from tests.conftest import HAM10000, ROOT
from training.calibrate import image_outputs
from training.compare_calibrators import CALIBRATOR_FIGURES, calibrators_scored, shipped_resplit
from training.data import read_samples, split_dataset
from training.evaluate import compute_metrics
from training.model_card import malignant_share, mean_malignant_probability, read_reports, render, scored_report
from training.ood import out_of_domain_set
from training.sources import SOURCES, answers


def report_of(arch: str) -> dict:
    return json.loads((ROOT / "model_store" / f"{arch}.json").read_text())


@dataclass
class Unseen:
    """About 500 lesion images the shipped weights never trained on (every third test image or, for weights
    trained on the test split too, every other validation image), decoded, their labels, and the network's outputs
    on them as served."""

    predictor: Predictor
    images: list[Image.Image]
    labels: torch.Tensor
    outputs: Outputs


@functools.cache
def unseen(arch: str) -> Unseen:
    arguments = report_of(arch)["arguments"]
    _, val, test = split_dataset(HAM10000, arguments["split_seed"])
    samples = val[::2] if arguments.get("train_on_test") else test[::3]
    predictor = Predictor.from_checkpoint(ROOT / "model_store" / f"{arch}.pt")
    images = [decode_image(s.path.read_bytes()) for s in samples]
    return Unseen(predictor, images, torch.tensor([s.label for s in samples]), image_outputs(predictor, images))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_shipped_weights_beat_the_majority_baseline_on_held_out_lesions(arch: str) -> None:
    lesions = unseen(arch)
    predictor = lesions.predictor
    assert predictor.arch == arch and predictor.image_size == DEFAULT_IMAGE_SIZE
    metrics = compute_metrics(lesions.labels.numpy(), predictor.calibrated(lesions.outputs.logits).numpy())
    # Majority class (nv) gives about 0.67 accuracy and 0.14 balanced accuracy on this split.
    assert metrics["accuracy"] > 0.72
    assert metrics["balanced_accuracy"] > 0.45


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_shipped_weights_carry_the_calibration_of_their_report(arch: str) -> None:
    predictor = Predictor.from_checkpoint(ROOT / "model_store" / f"{arch}.pt")
    report = report_of(arch)
    assert predictor.calibration.temperatures == pytest.approx(tuple(report["calibration"]["temperatures"].values()))
    assert predictor.calibration.domain_threshold == pytest.approx(report["calibration"]["out_of_domain"]["threshold"])
    assert predictor.calibration.malignancy_threshold == pytest.approx(report["calibration"]["malignancy"]["threshold"])
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "melanoma_auc", "expected_calibration_error"):
        assert predictor.card[key] == pytest.approx(scored_report(report)["test"][key])
    assert predictor.card.get("from_held_out_run", False) == ("held_out_run" in report)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_shipped_models_flag_non_lesions_and_pass_most_unseen_lesions(arch: str) -> None:
    lesions = unseen(arch)
    predictor, real, labels = lesions.predictor, lesions.outputs, lesions.labels
    # A draw of the out-of-domain set that neither chose nor reported the method (seeds 0 and 1 did).
    ood = image_outputs(predictor, [image for _, image in out_of_domain_set(lesions.images[:20], seed=2)])
    threshold = predictor.calibration.domain_threshold
    assert float((predictor.domain_scores(ood) > threshold).float().mean()) >= 0.9
    assert float((predictor.domain_scores(real) > threshold).float().mean()) <= 0.08
    # Calibrated probabilities fit these lesions better than the raw softmax.
    raw = torch.nn.functional.cross_entropy(real.logits, labels)
    assert torch.nn.functional.nll_loss(predictor.calibrated(real.logits).log(), labels) < raw


def test_the_model_card_is_generated_from_the_shipped_reports() -> None:
    expected = render(read_reports(ROOT / "model_store"))
    assert (ROOT / "MODEL_CARD.md").read_text() == expected, "run: python -m training.model_card"


def test_the_model_card_says_where_each_shipped_model_started() -> None:
    """A checkpoint continued from other weights, or distilled from teachers, is not called "from scratch"."""
    card = (ROOT / "MODEL_CARD.md").read_text().splitlines()
    for arch, report in read_reports(ROOT / "model_store").items():
        [line] = [line for line in card if line.startswith(f"- {arch}: ")]
        arguments = report["arguments"]
        start = {"none": "from scratch,", "imagenet": "from ImageNet weights,"}.get(arguments["weights"], "continued from")
        assert line.startswith(f"- {arch}: {start}")
        assert ("distilled from" in line) == bool(arguments.get("teacher"))


def figure(value: float) -> str:
    return f"{value:.3f}"


def labelled_row(text: str, label: str) -> list[str]:
    """The cells after the label of the one table row it starts (bold or not), bold marks removed."""
    rows = [line for line in text.splitlines() if line.startswith((f"| {label} |", f"| **{label}** |"))]
    assert len(rows) == 1, f"expected one row labelled {label!r}, found {len(rows)}"
    return [cell.strip().strip("*") for cell in rows[0].split("|")[2:-1]]


def calibration_figures(report: dict) -> dict[str, str]:
    """What docs/training.md's calibration results table quotes of one model's report, by row: test figures from
    the run that held the test split out (model_card.scored_report), fitted values and validation figures its own."""
    scored = scored_report(report)
    calibration, test, tested_calibration = report["calibration"], scored["test"], scored["calibration"]
    before, after, ood = tested_calibration["test_before"], tested_calibration["test_after"], tested_calibration["out_of_domain"]
    malignancy = tested_calibration["malignancy"]
    return {
        "temperatures by predicted class (akiec, bcc, bkl, df, mel, nv, vasc)":
            ", ".join(f"{t:.2f}" for t in calibration["temperatures"].values()),
        "test ECE, raw -> calibrated": f"{figure(before['ece'])} -> {figure(after['ece'])}",
        "test NLL, raw -> calibrated": f"{figure(before['nll'])} -> {figure(after['nll'])}",
        "out-of-domain AUROC (seed-1 draw vs test lesions)": figure(ood["report_set"]["auroc"]),
        "out-of-domain images flagged": figure(ood["report_set"]["flagged"]),
        "test lesions flagged": figure(ood["test_lesions_flagged"]),
        "malignancy alert: test sensitivity / specificity":
            f"{figure(malignancy['test_sensitivity'])} / {figure(malignancy['test_specificity'])}",
        "malignant vs benign AUC": figure(test["malignant_auc"]),
        "test ECE of perfectly calibrated probabilities: mean, 95th percentile":
            f"{figure(after['ece_if_calibrated']['mean'])}, {figure(after['ece_if_calibrated']['p95'])}",
        "test ECE if the split were drawn again: mean (90% range), 200 resplits":
            f"{figure(shipped_resplit(tested_calibration)['mean'])} ({figure(shipped_resplit(tested_calibration)['p5'])}-"
            f"{figure(shipped_resplit(tested_calibration)['p95'])})",
        "share of those resplits with ECE <= 0.03: shipped calibrator / one temperature":
            f"{shipped_resplit(tested_calibration)['share_at_target']:.2f} / "
            f"{after['ece_resplits']['one temperature']['share_at_target']:.2f}",
        "validation ECE, out of fold (5 lesion groups, 20 deals)": figure(calibration["validation_out_of_fold"]["ece"]),
        "accuracy at mean confidence, held-out runs: validation / test":
            f"{figure(tested_calibration['validation_out_of_fold']['accuracy'])} at "
            f"{figure(tested_calibration['validation_out_of_fold']['mean_confidence'])} / {figure(test['accuracy'])} "
            f"at {figure(after['mean_confidence'])}",
        "test P(malignant) ECE": figure(test["malignant_calibration_error"]),
        "test mean P(malignant) / share of malignant lesions":
            f"{figure(mean_malignant_probability(test))} / {figure(malignant_share(test))}",
    }


def calibrator_figures(report: dict) -> dict[str, list[str]]:
    """model_store/training-log.md's calibrator comparison: each calibrator's out-of-fold validation figures, by row."""
    return {name: [figure(m[key]) for key in CALIBRATOR_FIGURES]
            for name, m in calibrators_scored(report["calibration"]).items()}


@pytest.mark.parametrize("page", ["README.md", "docs/training.md"])
def test_metric_tables_quote_the_shipped_reports(page: str) -> None:
    """Each shipped model's row: its report's test figures, to 3 decimals."""
    text = (ROOT / page).read_text()
    for arch, report in read_reports(ROOT / "model_store").items():
        [row] = [line for line in text.splitlines() if line.startswith(f"| {arch} | 0.")]
        quoted = [cell.strip() for cell in row.split("|")[2:-1]]
        test, figures = scored_report(report)["test"], calibration_figures(report)
        keys = ("accuracy", "balanced_accuracy", "macro_auc", "melanoma_auc", "melanoma_sensitivity")
        sets = sets_measured_on_test(report)[str(DEFAULT_COVERAGE)]
        expected = [*(figure(test[key]) for key in keys), figures["malignancy alert: test sensitivity / specificity"],
                    figures["test ECE, raw -> calibrated"], figures["out-of-domain AUROC (seed-1 draw vs test lesions)"],
                    f"{sets['coverage']:.3f} / {sets['mean_size']:.2f}"]
        assert quoted == expected, f"{page}: {arch}'s row differs from model_store/{arch}.json"


def sets_measured_on_test(report: dict) -> dict[str, dict]:
    """A shipped report's prediction-set figures on the test split by level (the held-out run's, where trained on it)."""
    return scored_report(report)["calibration"]["prediction_sets"]["test"]["levels"]


def set_cell(figures: dict) -> str:
    return (f"{figures['coverage']:.3f} / {figures['melanoma_coverage']:.3f} / {figures['malignant_coverage']:.3f}, "
            f"{figures['mean_size']:.2f}")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_shipped_prediction_sets_meet_their_targets_and_the_guide_quotes_them(arch: str) -> None:
    """On the test split of the held-out run: coverage at least each level less 0.02 (the sets keep the most probable
    class, so they may cover more), melanoma and the malignant classes at least the level less 0.03, the 0.9 sets
    within 0.02 of it and at most two classes long on average."""
    report = report_of(arch)
    sets = Predictor.from_checkpoint(ROOT / "model_store" / f"{arch}.pt").calibration.sets
    fitted = report["calibration"]["prediction_sets"]
    assert sets.score == fitted["score"]
    for level, thresholds in fitted["thresholds"].items():
        assert [None if t == float("inf") else t for t in sets.thresholds[float(level)]] == pytest.approx(
            list(thresholds.values()))
    tested = sets_measured_on_test(report)
    assert set(tested) == {str(level) for level in COVERAGE_LEVELS}
    for level, figures in tested.items():
        assert figures["coverage"] >= float(level) - 0.02, level
        assert min(figures["melanoma_coverage"], figures["malignant_coverage"]) >= float(level) - 0.03, level
    assert abs(tested[str(DEFAULT_COVERAGE)]["coverage"] - DEFAULT_COVERAGE) <= 0.02
    assert tested[str(DEFAULT_COVERAGE)]["mean_size"] <= 2.0
    text = (ROOT / "docs" / "training.md").read_text()
    assert labelled_row(text, f"{arch}, test split") == [set_cell(tested[str(level)]) for level in COVERAGE_LEVELS]


def test_calibration_tables_quote_the_shipped_reports() -> None:
    """The guide's results table; the out-of-domain candidates and the calibrators compared are in the log."""
    text = (ROOT / "docs" / "training.md").read_text()
    reports = read_reports(ROOT / "model_store")
    archs = sorted(reports)
    assert f"| | {' | '.join(archs)} | target |" in text  # the results table's columns
    for label in calibration_figures(reports[archs[0]]):
        assert labelled_row(text, label)[:len(archs)] == [calibration_figures(reports[a])[label] for a in archs], label
    text = (ROOT / "model_store" / "training-log.md").read_text()
    candidates = {arch: reports[arch]["calibration"]["out_of_domain"]["selection_set"]["candidates"] for arch in archs}
    for name in candidates[archs[0]]:
        expected = [figure(value) for a in archs for value in (candidates[a][name]["auroc"], candidates[a][name]["flagged"],
                                                                candidates[a][name]["lesions_flagged"]["full-size photos"])]
        assert labelled_row(text, name) == expected, name
    calibrators = {arch: calibrator_figures(reports[arch]) for arch in archs}
    for name in calibrators[archs[0]]:
        assert labelled_row(text, name) == [cell for a in archs for cell in calibrators[a][name]], name


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_one_photos_domain_score_barely_moves_with_its_size_and_quality(arch: str, original_photo) -> None:
    """The check once read the sharpness of the model input per colour channel, which told a 600x450 original
    from the 200x150 copies it was fitted on: this photo scored 3.3 against a threshold of 2.2."""
    predictor = Predictor.from_checkpoint(ROOT / "model_store" / f"{arch}.pt")
    photo = decode_image(original_photo.read_bytes())
    sources = ["as given", "200x150, JPEG 75 (the training copies)", "600x450, JPEG 95", "1200x900, JPEG 90",
               "4000x3000, JPEG 85", "turned a quarter"]
    _, scores = answers(predictor, [SOURCES[name](photo) for name in sources])
    assert float(scores.max() - scores.min()) < 0.3, dict(zip(sources, scores.tolist(), strict=True))
    assert float(scores.max()) < predictor.calibration.domain_threshold


def test_full_size_photos_and_their_copies_get_the_same_answers(fullres_images) -> None:
    """The served model on the 220 full-size photos, their 200x150 training copies and 1200x900 upscales of every
    other one: the label agrees on at least 98% of pairs, the probabilities move little, and at most 5% of each is
    flagged out of domain."""
    predictor = Predictor.from_checkpoint(ROOT / "model_store" / "resnet34.pt")
    copies = {s.image_id: s.path for s in read_samples(HAM10000)}
    photos = [decode_image(path.read_bytes()) for path in fullres_images]
    full, full_scores = answers(predictor, photos)
    copy, copy_scores = answers(predictor, [decode_image(copies[path.stem].read_bytes()) for path in fullres_images])
    upscaled, upscaled_scores = answers(predictor, [SOURCES["1200x900, JPEG 90"](photo) for photo in photos[::2]])
    threshold = predictor.calibration.domain_threshold
    for given, other in ((full, copy), (full[::2], upscaled)):
        assert float((given.argmax(1) == other.argmax(1)).float().mean()) >= 0.98
        assert float((given - other).abs().max(1).values.mean()) < 0.05
    for scores in (full_scores, copy_scores, upscaled_scores):
        assert float((scores > threshold).float().mean()) <= 0.05


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_random_noise_is_flagged_at_every_size(arch: str) -> None:
    """Shrunk to the model's input, noise is a faintly grainy grey that the input statistics alone no longer set
    far apart (they read no full-resolution detail, which tells the photo's source); the trained features do."""
    predictor = Predictor.from_checkpoint(ROOT / "model_store" / f"{arch}.pt")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((150, 200), (450, 600), (900, 1200))]
    _, scores = answers(predictor, images)
    assert bool((scores > predictor.calibration.domain_threshold).all()), scores.tolist()
