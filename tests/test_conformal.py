"""Prediction sets: conformal coverage on exchangeable samples, their fit in the checkpoint, and every answer's set."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
import torch

from serving.service import respond
from skinlesion.calibration import SET_SCORES, Calibration, SetFit, prediction_sets, set_scores
from skinlesion.model import CLASS_CODES, CLASS_NAMES
from skinlesion.options import COVERAGE_LEVELS, DEFAULT_COVERAGE
from skinlesion.predictor import Predictor
from tests.conftest import ramp_image
from tests.test_calibration import png_b64
from training.conformal import (
    GROUPINGS,
    MELANOMA,
    choose_sets,
    conformal_quantile,
    fit_sets,
    set_figures,
)

MALIGNANT = torch.tensor([CLASS_CODES.index(c) for c in ("akiec", "bcc", "mel")])


def calibrated_sample(n: int, sharpness: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and labels drawn from them: a perfectly calibrated model, surer as `sharpness` grows. Melanoma
    is made the hard class (its logits damped), where marginal coverage falls short."""
    generator = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(n, len(CLASS_CODES), generator=generator)
    logits[:, MELANOMA] *= 0.3
    probabilities = logits.softmax(1)
    return probabilities, torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


def sampling_error(level: float, n: int) -> float:
    return 3 * math.sqrt(level * (1 - level) / n)


@pytest.mark.parametrize("score", SET_SCORES)
def test_sets_cover_new_exchangeable_images_at_each_level_within_sampling_error(score: str) -> None:
    fit_probabilities, fit_labels = calibrated_sample(3_000, 2.5, seed=0)
    new_probabilities, new_labels = calibrated_sample(30_000, 2.5, seed=1)
    fit = fit_sets(fit_probabilities, fit_labels, score, "melanoma, other malignant, benign")
    for level in COVERAGE_LEVELS:
        figures = set_figures(fit.members(new_probabilities, level), new_labels)
        melanomas = int((fit_labels == MELANOMA).sum())
        error = sampling_error(level, 3_000) + sampling_error(level, 30_000)
        assert figures["coverage"] >= level - error
        # Not randomised, aps counts the whole probability of the class that reaches the threshold: it covers more
        # than asked (training.conformal's comparison shows by how much on validation lesions).
        if score != "aps":
            assert figures["coverage"] <= level + error
        # The grouping calibrates melanoma alone and the malignant classes together.
        assert figures["melanoma_coverage"] >= level - sampling_error(level, melanomas)
        assert figures["malignant_coverage"] >= level - sampling_error(level, int(torch.isin(fit_labels, MALIGNANT).sum()))


def test_marginal_sets_under_cover_the_hard_class_that_its_own_group_covers() -> None:
    fit_probabilities, fit_labels = calibrated_sample(3_000, 2.5, seed=0)
    new_probabilities, new_labels = calibrated_sample(30_000, 2.5, seed=1)
    marginal = fit_sets(fit_probabilities, fit_labels, "lac", "marginal")
    grouped = fit_sets(fit_probabilities, fit_labels, "lac", "melanoma, other malignant, benign")
    for level in COVERAGE_LEVELS:
        assert set_figures(marginal.members(new_probabilities, level), new_labels)["melanoma_coverage"] < level - 0.03
        melanomas = int((fit_labels == MELANOMA).sum())
        assert set_figures(grouped.members(new_probabilities, level), new_labels)["melanoma_coverage"] >= (
            level - sampling_error(level, melanomas))


def test_sets_shrink_as_the_model_gets_surer() -> None:
    sizes = []
    for sharpness in (1.0, 2.5, 5.0):
        fit_probabilities, fit_labels = calibrated_sample(3_000, sharpness, seed=0)
        new_probabilities, new_labels = calibrated_sample(10_000, sharpness, seed=1)
        fit = fit_sets(fit_probabilities, fit_labels, "lac", "melanoma, other malignant, benign")
        sizes.append([set_figures(fit.members(new_probabilities, level), new_labels)["mean_size"]
                      for level in COVERAGE_LEVELS])
    for level in range(len(COVERAGE_LEVELS)):
        assert sizes[0][level] > sizes[1][level] > sizes[2][level]
    # And grow with the level asked.
    assert all(row == sorted(row) for row in sizes)


def test_the_conformal_quantile_needs_enough_images_for_the_level() -> None:
    scores = torch.arange(1, 20, dtype=torch.float64) / 20  # 19 scores
    assert conformal_quantile(scores, 0.9) == pytest.approx(18 / 20)  # the ceil(20 * 0.9) = 18th smallest
    assert conformal_quantile(scores, 0.95) == pytest.approx(19 / 20)
    assert conformal_quantile(scores[:10], 0.95) == math.inf  # 11 * 0.95 rounds up past 10: the class always joins


def test_set_scores_rank_classes_by_probability_and_the_top_class_is_always_in() -> None:
    probabilities = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.01, 0.01]], dtype=torch.float64)
    assert set_scores(probabilities, "lac")[0, :3].tolist() == pytest.approx([0.5, 0.7, 0.9])
    assert set_scores(probabilities, "aps")[0, :3].tolist() == pytest.approx([0.5, 0.8, 0.9])
    assert set_scores(probabilities, "raps")[0, :3].tolist() == pytest.approx([0.5, 0.9, 1.1])
    assert prediction_sets(probabilities, "lac", (0.0,) * 7)[0].tolist() == [True] + [False] * 6
    with pytest.raises(ValueError, match="unknown set score"):
        set_scores(probabilities, "topk")


def test_the_choice_is_made_among_groupings_that_guarantee_melanoma_and_is_reported() -> None:
    probabilities, labels = calibrated_sample(1_500, 2.5, seed=3)
    lesions = [f"lesion{i // 2}" for i in range(1_500)]
    fit, report = choose_sets(probabilities, labels, lesions)
    assert report["grouping"] != "marginal" and report["score"] == fit.score
    assert set(report["validation_out_of_fold"]) == {f"{s}, {g}" for s in SET_SCORES for g in GROUPINGS}
    chosen = report["validation_out_of_fold"][f"{report['score']}, {report['grouping']}"]
    assert all(chosen[str(DEFAULT_COVERAGE)]["mean_size"] <= report["validation_out_of_fold"][f"{s}, {g}"][
        str(DEFAULT_COVERAGE)]["mean_size"] for s in SET_SCORES for g in GROUPINGS if g != "marginal")
    assert set(fit.thresholds) == set(COVERAGE_LEVELS)


def test_the_fitted_sets_are_stored_in_the_checkpoint_and_reported_on_test(checkpoints: Path) -> None:
    predictor = Predictor.from_checkpoint(checkpoints / "resnet18.pt")
    sets = predictor.calibration.sets
    assert isinstance(sets, SetFit) and sets.score in SET_SCORES and set(sets.thresholds) == set(COVERAGE_LEVELS)
    again = Calibration.from_state(predictor.calibration.to_state())
    assert again.sets == sets
    served = predictor.model_card()
    json.dumps(served, allow_nan=False)  # strict JSON, unbounded thresholds included
    assert served["prediction_sets"]["levels"] == list(COVERAGE_LEVELS) and served["prediction_sets"]["score"] == sets.score
    card = served["test_metrics"]["prediction_sets"]
    assert set(card["test"]) == {str(level) for level in COVERAGE_LEVELS}
    for level, figures in card["test"].items():
        assert 0 <= figures["coverage"] <= 1 and 1 <= figures["mean_size"] <= len(CLASS_CODES)
        assert set(figures["per_class"]) == set(CLASS_CODES)
        assert level in card["validation_out_of_fold"]
    # The shipped-style resnet34 (trained on the test split too) quotes its held-out run's test figures.
    assert Predictor.from_checkpoint(checkpoints / "resnet34.pt").card["prediction_sets"]["test"]


def test_every_answer_carries_its_prediction_set_most_probable_first(predictor, fullres_images) -> None:
    body = {"image": base64.b64encode(fullres_images[0].read_bytes()).decode()}
    answers = {level: respond(predictor, [{**body, "coverage": level}])[0] for level in COVERAGE_LEVELS}
    for level, (status, answer) in answers.items():
        assert status == 200 and answer["set_coverage"] == level
        members = answer["prediction_set"]
        assert members[0] == answer["prediction"] and set(members) <= set(CLASS_NAMES)
        assert [answer["probabilities"][m] for m in members] == sorted((answer["probabilities"][m] for m in members),
                                                                        reverse=True)
    # A higher level never drops a class.
    sets = [set(answers[level][1]["prediction_set"]) for level in COVERAGE_LEVELS]
    assert all(low <= high for low, high in zip(sets, sets[1:], strict=False))
    [(status, default)] = respond(predictor, [body])
    assert default["set_coverage"] == DEFAULT_COVERAGE


def test_an_out_of_domain_image_gets_every_class(predictor) -> None:
    [(status, answer)] = respond(predictor, [{"image": png_b64(ramp_image())}])
    assert status == 200 and answer["in_domain"] is False
    assert sorted(answer["prediction_set"]) == sorted(CLASS_NAMES)
    assert "prediction set holds every class" in answer["warnings"][0]["message"]


@pytest.mark.parametrize("coverage", [0.85, "0.9", True, None, [0.9], 90])
def test_a_coverage_off_the_list_is_a_400_naming_the_allowed_levels(predictor, fullres_images, coverage) -> None:
    body = {"image": base64.b64encode(fullres_images[0].read_bytes()).decode(), "coverage": coverage}
    [(status, answer)] = respond(predictor, [body])
    assert status == 400 and answer["success"] is False
    assert all(str(level) in answer["error"] for level in COVERAGE_LEVELS) and "'coverage'" in answer["error"]
