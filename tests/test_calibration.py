"""Calibration, the out-of-domain check, the malignancy alert and the model card: fitting, storage, the answer's
fields (the /predict contract), and GET /model's request body shared with nginx."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from serving.service import MODEL_CARD_REQUEST, respond
from skinlesion.calibration import (
    MALIGNANT_CODES,
    Calibration,
    class_tempered_softmax,
    is_malignant,
    malignant_probability,
)
from skinlesion.image import decode_image, dihedral_views
from skinlesion.model import ARCHITECTURES, CLASS_CODES, CLASS_NAMES, DEFAULT_IMAGE_SIZE, build_model, save_checkpoint
from skinlesion.predictor import Predictor
from tests.conftest import ROOT, ramp_image
from training.compare_calibrators import (
    CALIBRATORS,
    OUT_OF_FOLD_GROUPS,
    class_temperatures,
    fit_temperature,
    out_of_fold_calibration,
    resplit_calibration_error,
    temperature_and_class_bias,
    temperature_scaling,
)
from training.data import lesion_folds
from training.evaluate import calibration_error_floor, expected_calibration_error
from training.fitting import (
    MALIGNANCY_SENSITIVITY,
    fit_class_temperatures,
    fit_malignancy_threshold,
    validation_pass_rate,
)
from training.ood import SAMPLE_PHOTOS, out_of_domain_set


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_fit_temperature_recovers_the_temperature_that_drew_the_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 7, generator=generator)
    labels = torch.multinomial((logits / 2.5).softmax(1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def labels_drawn_by_predicted_class(logits: torch.Tensor, temperatures: list[float], seed: int = 0) -> torch.Tensor:
    """Labels drawn from softmax(logits / T_k), k each row's top class: a network whose confidence is off by a
    different factor for each class it names."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(class_tempered_softmax(logits, tuple(temperatures)), 1, generator=generator).squeeze(1)


@pytest.mark.slow  # tens of seconds: ./test.sh quick leaves it out
def test_class_temperatures_recover_the_temperatures_that_drew_the_labels_and_keep_the_label() -> None:
    """Underconfident when it names the common class (5, nv), overconfident when it names a rarer one: one
    temperature per predicted class undoes both, which one shared temperature cannot."""
    truth = [2.0, 2.0, 2.0, 2.0, 2.0, 0.6, 2.0]
    logits = 2 * torch.randn(30_000, 7, generator=torch.Generator().manual_seed(1))
    logits[:, 5] += 1.5  # the common class is predicted most often
    labels = labels_drawn_by_predicted_class(logits, truth)
    fitted = fit_class_temperatures(logits, labels)
    assert fitted == pytest.approx(truth, rel=0.1)
    assert torch.equal(class_tempered_softmax(logits, fitted).argmax(1), logits.argmax(1))
    # A class never predicted gets the temperature that fits the top label of the whole split.
    logits[:, 3] = -100.0
    assert fit_class_temperatures(logits, labels)[3] == pytest.approx(fit_class_temperatures(logits, labels, 1e9)[5],
                                                                      rel=0.01)
    fit, held_out = slice(0, 20_000), slice(20_000, None)
    truth_labels = labels[held_out].numpy()

    def ece(calibrator) -> float:
        return expected_calibration_error(truth_labels, calibrator(logits[fit], labels[fit])(logits[held_out]).numpy())

    assert ece(class_temperatures) < 0.015 < ece(temperature_scaling) - 0.01


def test_resplits_measure_what_the_refitted_calibrator_gives_new_lesions() -> None:
    truth = [2.0, 2.0, 2.0, 2.0, 2.0, 0.6, 2.0]
    logits = 2 * torch.randn(4_000, 7, generator=torch.Generator().manual_seed(2))
    logits[:, 5] += 1.5
    labels = labels_drawn_by_predicted_class(logits, truth, seed=2)
    lesions = [f"lesion{i // 2}" for i in range(4_000)]  # two images each
    spread = resplit_calibration_error(logits, labels, lesions, calibration_lesions=1_000, draws=20)
    assert spread["draws"] == 20 and spread["p5"] <= spread["mean"] <= spread["p95"]
    # Fitted on 1,000 lesions, scored on the other 2,000 images: about what the true probabilities would measure.
    floor = calibration_error_floor(class_tempered_softmax(logits[:2_000], tuple(truth)).numpy())
    assert floor["mean"] - 0.01 < spread["mean"] < floor["p95"] + 0.005


def test_out_of_fold_calibration_scores_each_fold_with_the_others_temperatures() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3_000, 7, generator=generator)
    labels = torch.multinomial((logits / 2.5).softmax(1), 1, generator=generator).squeeze(1)
    lesions = [f"lesion{i // 3}" for i in range(3_000)]  # three images each
    report = out_of_fold_calibration(logits, labels, lesions, deals=2)
    assert report["folds"] == OUT_OF_FOLD_GROUPS and report["deals"] == 2
    # Each fold's temperatures, fitted on the other four, are close to the one that drew the labels.
    assert report["ece"] < report["ece_if_calibrated"]["p95"] + 0.01
    raw = torch.nn.functional.cross_entropy(logits, labels).item()
    assert report["nll"] < raw - 0.1
    assert report["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits / 2.5, labels).item(), abs=0.01)


@pytest.mark.slow  # tens of seconds: ./test.sh quick leaves it out
def test_a_class_bias_undoes_the_lean_a_temperature_cannot() -> None:
    """Labels drawn from softmax(logits / 2 + b), as from a network trained with class weights that favour the
    rarer classes: the temperature alone leaves every probability leaning away from the common class (5, nv)."""
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6_000, 7, generator=generator)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.5, 0.0])
    truth = (logits / 2 + bias).softmax(1)
    labels = torch.multinomial(truth, 1, generator=generator).squeeze(1)
    fit, held_out = slice(0, 4_000), slice(4_000, None)
    with_bias = temperature_and_class_bias(logits[fit], labels[fit])(logits[held_out])
    temperature_only = temperature_scaling(logits[fit], labels[fit])(logits[held_out])
    assert (with_bias - truth[held_out]).abs().mean() < 0.01
    expected_share = truth[held_out, 5].mean()
    assert with_bias[:, 5].mean() == pytest.approx(expected_share, abs=0.01)
    assert temperature_only[:, 5].mean() < expected_share - 0.1
    # Out of fold, the report tells them apart the same way.
    lesions = [f"lesion{i // 2}" for i in range(6_000)]
    scored = {name: out_of_fold_calibration(logits, labels, lesions, fit=fit, deals=2) for name, fit in CALIBRATORS.items()}
    shipped, alternative = scored["one temperature"], scored["one temperature and class bias"]
    assert alternative["nll"] < shipped["nll"] - 0.05
    assert alternative["malignant_ece"] < shipped["malignant_ece"]
    assert alternative["mean_malignant_probability"] == pytest.approx(alternative["malignant_share"], abs=0.02)
    assert shipped["mean_malignant_probability"] > shipped["malignant_share"] + 0.05
    assert shipped["malignant_share"] == pytest.approx(float(is_malignant(labels).double().mean()))


def test_validation_folds_follow_lesions() -> None:
    lesions = [f"lesion{i % 40}" for i in range(100)]  # 40 lesions, two or three images each
    folds = lesion_folds(lesions, 5)
    for lesion in set(lesions):
        assert len({int(folds[i]) for i, name in enumerate(lesions) if name == lesion}) == 1
    assert sorted(len({lesions[i] for i in range(100) if folds[i] == k}) for k in range(5)) == [8] * 5


def test_malignancy_threshold_reaches_its_sensitivity_on_the_fitting_lesions() -> None:
    generator = torch.Generator().manual_seed(1)
    probabilities = torch.rand(500, 7, generator=generator).softmax(1)
    labels = torch.randint(0, 7, (500,), generator=generator)
    threshold = fit_malignancy_threshold(probabilities, labels)
    alert = malignant_probability(probabilities) >= threshold
    malignant = is_malignant(labels)
    assert float(alert[malignant].float().mean()) >= MALIGNANCY_SENSITIVITY
    # The highest such threshold: one step higher and the sensitivity falls below the target.
    assert float((malignant_probability(probabilities)[malignant] > threshold).float().mean()) < MALIGNANCY_SENSITIVITY
    assert [CLASS_CODES[i] for i in range(7) if is_malignant(torch.tensor([i]))] == list(MALIGNANT_CODES)


def test_the_domain_threshold_keeps_a_margin_above_the_target_pass_rate() -> None:
    assert validation_pass_rate(997) == pytest.approx(0.9614, abs=1e-3)
    assert validation_pass_rate(100_000) == pytest.approx(0.95, abs=2e-3)


def test_calibration_is_stored_in_the_checkpoint_and_read_back(checkpoints: Path) -> None:
    predictor = Predictor.from_checkpoint(checkpoints / "resnet18.pt")
    calibration = predictor.calibration
    assert isinstance(calibration, Calibration)
    assert len(calibration.temperatures) == len(CLASS_CODES) and min(calibration.temperatures) > 0
    again = Calibration.from_state(torch.load(checkpoints / "resnet18.pt", weights_only=True)["calibration"])
    assert again.domain_threshold == calibration.domain_threshold and again.temperatures == calibration.temperatures
    assert torch.equal(again.domain["features"].precision, calibration.domain["features"].precision)
    assert predictor.card["test_images"] > 0 and 0 <= predictor.card["accuracy"] <= 1


def test_probabilities_are_the_softmax_at_the_predicted_class_temperature(predictor, fullres_images) -> None:
    inputs = torch.stack([predictor.preprocess(decode_image(p.read_bytes())) for p in fullres_images[:3]])
    logits = predictor.outputs(inputs).logits
    temperatures = torch.tensor(predictor.calibration.temperatures)[logits.argmax(1)]
    assert not torch.allclose(temperatures, torch.ones(3))
    assert torch.allclose(predictor.probabilities(inputs), (logits / temperatures[:, None]).softmax(1), atol=1e-6)
    # What LIME explains: the network's own softmax.
    assert torch.allclose(predictor.probabilities(inputs, calibrated=False), logits.softmax(1), atol=1e-6)


def test_the_calibration_sets_how_plain_predictions_run(checkpoints: Path, fullres_images) -> None:
    """A checkpoint calibrated for the four flips serves their average, and its card says so."""
    plain = Predictor.from_checkpoint(checkpoints / "resnet18.pt")
    state = torch.load(checkpoints / "resnet18.pt", weights_only=True)["calibration"]
    flips = Calibration.from_state({**state, "views": "flips", "bfloat16": False})
    served = Predictor(plain.model, plain.arch, plain.image_size, calibration=flips)
    images = [decode_image(p.read_bytes()) for p in fullres_images[:3]]
    inputs = torch.stack([plain.preprocess(im) for im in images])
    each_view = torch.stack([plain.outputs(view, statistics=False).logits for view in dihedral_views(inputs, "flips")])
    expected = class_tempered_softmax(each_view.mean(0), flips.temperatures)
    answers = served.predict(images)
    assert torch.allclose(torch.tensor([list(a["probabilities"].values()) for a in answers]), expected, atol=1e-5)
    assert float((each_view - each_view.mean(0)).abs().max()) > 0  # the views do differ
    assert served.model_card()["inference"] == {"views": "flips", "view_count": 4, "precision": "float32"}
    # A calibration stored before the inference mode existed reads back as one view in float32.
    older = Calibration.from_state({k: v for k, v in state.items() if k not in ("views", "bfloat16")})
    assert (older.views, older.bfloat16) == ("none", False)
    # One stored before temperatures were per class applies its one temperature to every class.
    shared = Calibration.from_state({**{k: v for k, v in state.items() if k != "temperatures"}, "temperature": 1.7})
    assert shared.temperatures == (1.7,) * len(CLASS_CODES)


def test_every_answer_carries_the_trust_fields(predictor, fullres_images) -> None:
    body = {"image": base64.b64encode(fullres_images[0].read_bytes()).decode()}
    [(status, answer)] = respond(predictor, [body])
    assert status == 200 and answer["success"] is True
    assert answer["malignant_probability"] == pytest.approx(
        sum(answer["probabilities"][CLASS_NAMES[CLASS_CODES.index(code)]] for code in MALIGNANT_CODES))
    assert answer["malignancy_alert"] is (answer["malignant_probability"] >= predictor.calibration.malignancy_threshold)
    assert isinstance(answer["in_domain"], bool) and isinstance(answer["domain_score"], float)
    assert answer["in_domain"] is (answer["domain_score"] <= predictor.calibration.domain_threshold)
    assert isinstance(answer["warnings"], list)
    assert all(set(w) == {"code", "message"} for w in answer["warnings"])
    json.dumps(answer)


@pytest.mark.parametrize("image", [ramp_image(), Image.new("RGB", (600, 450), (128, 128, 128))], ids=["ramp", "grey"])
def test_a_generated_image_is_answered_out_of_domain_with_its_prediction(predictor, image: Image.Image) -> None:
    [(status, answer)] = respond(predictor, [{"image": png_b64(image)}])
    assert status == 200 and answer["success"] is True and answer["prediction"] in CLASS_NAMES
    assert answer["in_domain"] is False
    assert answer["domain_score"] > predictor.calibration.domain_threshold
    [warning] = answer["warnings"]
    assert warning["code"] == "out_of_domain" and "does not look like" in warning["message"]


def test_an_uncalibrated_checkpoint_answers_plain_softmax_and_says_so(tmp_path: Path, fullres_images) -> None:
    torch.manual_seed(0)
    save_checkpoint(build_model("resnet18"), "resnet18", DEFAULT_IMAGE_SIZE, tmp_path / "plain.pt")
    predictor = Predictor.from_checkpoint(tmp_path / "plain.pt")
    assert predictor.calibration is None
    [(status, answer)] = respond(predictor, [{"image": base64.b64encode(fullres_images[0].read_bytes()).decode()}])
    assert status == 200
    assert answer["in_domain"] is None and answer["malignancy_alert"] is None and answer["domain_score"] is None
    assert [w["code"] for w in answer["warnings"]] == ["uncalibrated"]
    card = predictor.model_card()
    assert card["calibrated"] is False and card["thresholds"] == {"out_of_domain": None, "malignancy": None}
    assert card["temperatures"] is None


def test_the_model_card_request_is_answered_with_the_card(predictor) -> None:
    for body in (MODEL_CARD_REQUEST, json.dumps(MODEL_CARD_REQUEST).encode()):
        [(status, card)] = respond(predictor, [body])
        assert status == 200 and card["success"] is True
        assert card["architecture"] == card["version"] == "resnet18"
        assert [c["name"] for c in card["classes"]] == list(CLASS_NAMES)
        assert card["input_size"] == {"height": DEFAULT_IMAGE_SIZE[0], "width": DEFAULT_IMAGE_SIZE[1]}
        assert card["temperatures"] == dict(zip(CLASS_CODES, predictor.calibration.temperatures, strict=True))
        assert card["inference"]["views"] == predictor.views and card["inference"]["view_count"] >= 1
        assert card["thresholds"]["out_of_domain"] == predictor.calibration.domain_threshold
        assert card["test_metrics"] == predictor.card
    # Any other body is a prediction request as before.
    [(status, answer)] = respond(predictor, [{"model_card": False}])
    assert status == 400 and "'image' is required" in answer["error"]


def test_nginx_asks_for_the_card_with_the_body_the_handler_knows() -> None:
    conf = (ROOT / "serving" / "nginx.conf").read_text()
    location = re.search(r"location = /model \{.*?proxy_set_body '([^']*)';", conf, re.S)
    assert json.loads(location[1]) == MODEL_CARD_REQUEST


def test_the_out_of_domain_set_has_every_kind_and_each_seed_draws_anew(fullres_images) -> None:
    lesions = [decode_image(p.read_bytes()) for p in fullres_images[:4]]
    first, second = out_of_domain_set(lesions, 0), out_of_domain_set(lesions, 1)
    kinds = {kind for kind, _ in first}
    assert kinds == {"photo", "noise", "solid colour", "gradient", "checkerboard", "text", "cropped lesion", "blurred lesion"}
    assert sum(kind == "photo" for kind, _ in first) == 4 * len(SAMPLE_PHOTOS)
    assert all(image.mode == "RGB" for _, image in first)
    differing = [a for (_, a), (_, b) in zip(first, second, strict=True) if a.tobytes() != b.tobytes()]
    assert len(differing) > len(first) // 2


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_test_checkpoints_of_every_architecture_are_calibrated(checkpoints: Path, arch: str) -> None:
    assert Predictor.from_checkpoint(checkpoints / f"{arch}.pt").calibration is not None
