"""Explanations on a real full-size photo with the shipped resnet18: shapes, types, determinism, errors."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinlesion import explain
from skinlesion.image import resize
from skinlesion.model import CLASS_NAMES
from skinlesion.predictor import Predictor

# The shipped resnet18's answer for the photo (Melanocytic nevi): a class the photo holds evidence for, as an answer's
# explanation does (Grad-CAM of a class without any marks nothing: test_grad_cam_of_a_class_without_evidence_marks_nothing).
LABEL = 5


@pytest.fixture(scope="module")
def photo(fullres_images: list[Path]) -> Image.Image:
    image = Image.open(fullres_images[0])
    image.load()
    return image


@pytest.fixture(scope="module")
def lime_payload(predictor: Predictor, photo: Image.Image) -> dict:
    return explain.explanation_payload(predictor, photo, LABEL, "lime", "Low", seed=3)


@pytest.fixture(scope="module")
def gradcam_payload(predictor: Predictor, photo: Image.Image) -> dict:
    return explain.explanation_payload(predictor, photo, LABEL, "gradcam", "Low")


@pytest.fixture(scope="module")
def gradient_payload(predictor: Predictor, photo: Image.Image) -> dict:
    return explain.explanation_payload(predictor, photo, LABEL, "gradient", "Low")


@pytest.fixture(params=["lime", "gradcam", "gradient"])
def payload(request: pytest.FixtureRequest) -> dict:
    return request.getfixturevalue(f"{request.param}_payload")


def test_explain_array_is_a_small_rgb_uint8_image(payload: dict, photo: Image.Image) -> None:
    pixels = np.array(payload["explain"])
    assert pixels.ndim == 3 and pixels.shape[2] == 3
    assert max(pixels.shape[:2]) <= explain.EXPLAIN_MAX_SIDE
    # The photo's aspect ratio survives the shrink (to a pixel).
    assert abs(pixels.shape[1] / pixels.shape[0] - photo.width / photo.height) < 0.02
    assert pixels.min() >= 0 and pixels.max() <= 255
    assert all(type(v) is int for v in payload["explain"][0][0])


def test_png_decodes_to_the_original_size(payload: dict, photo: Image.Image) -> None:
    png = Image.open(io.BytesIO(base64.b64decode(payload["explanation"]["image_png"])))
    assert png.format == "PNG" and png.mode == "RGB"
    assert png.size == photo.size  # 600x450 is within the 1024 px limit


def test_payload_is_plain_json(payload: dict) -> None:
    text = json.dumps(payload)
    assert json.loads(text)["explanation"] == payload["explanation"]
    assert set(payload) == {"explain", "explanation"}
    assert set(payload["explanation"]) == {"method", "precision", "num_samples", "label", "seconds", "image_png",
                                           "attribution_png", "regions", "check"}
    assert payload["explanation"]["label"] == CLASS_NAMES[LABEL]
    assert payload["explanation"]["seconds"] > 0


def test_the_attribution_png_is_a_grayscale_map_at_the_overlays_size(payload: dict, photo: Image.Image) -> None:
    attribution = Image.open(io.BytesIO(base64.b64decode(payload["explanation"]["attribution_png"])))
    overlay = Image.open(io.BytesIO(base64.b64decode(payload["explanation"]["image_png"])))
    assert attribution.format == "PNG" and attribution.mode == "L" and attribution.size == overlay.size
    assert np.asarray(attribution).max() == 255  # the strongest support


def test_the_attribution_is_brightest_where_the_overlay_marks(predictor: Predictor, photo: Image.Image) -> None:
    for explanation in (explain.explain_lime(predictor, photo, LABEL, "Low", seed=3),
                        explain.explain_gradcam(predictor, photo, LABEL), explain.explain_gradient(predictor, photo, LABEL)):
        overlay, attribution = explain.render(photo, explanation)
        marked = explain.on_photo(explanation.marked, photo, Image.Resampling.NEAREST)
        assert marked.any() and not marked.all()
        assert attribution[marked].mean() > 2 * attribution[~marked].mean()
        assert overlay.shape == (*attribution.shape, 3)


def test_the_check_hides_the_marked_area_and_a_random_one_of_its_size(predictor: Predictor, photo: Image.Image,
                                                                      payload: dict) -> None:
    check = payload["explanation"]["check"]
    assert set(check) == {"probability", "marked_hidden", "random_hidden"}
    assert all(type(value) is float and 0 <= value <= 1 for value in check.values())
    [answer] = predictor.predict([photo])
    # From a batch of its own, to float32's rounding; the service passes the answer's own number (stated, below).
    assert check["probability"] == pytest.approx(answer["probabilities"][CLASS_NAMES[LABEL]], rel=1e-5)
    marked = explain.explain_gradient(predictor, photo, LABEL).marked
    elsewhere = explain.moved(marked)
    assert elsewhere.sum() == marked.sum() and (elsewhere & marked).sum() < marked.sum() / 2
    # Nothing hidden, nothing changes: the three are the answer's own computation.
    nothing = explain.self_check(predictor, photo, LABEL, np.zeros_like(marked))
    assert nothing["probability"] == nothing["marked_hidden"] == nothing["random_hidden"] == check["probability"]
    # Given the probability the answer states, the check hides the same areas and keeps that number.
    stated = explain.self_check(predictor, photo, LABEL, marked, stated=0.5)
    computed = explain.self_check(predictor, photo, LABEL, marked)
    assert stated["probability"] == 0.5
    assert stated["marked_hidden"] == pytest.approx(computed["marked_hidden"], abs=1e-4)
    assert stated["random_hidden"] == pytest.approx(computed["random_hidden"], abs=1e-4)


def test_grad_cam_of_a_class_without_evidence_marks_nothing(predictor: Predictor, photo: Image.Image) -> None:
    """Melanoma, asked of this nevus: the gradient-weighted sum of the layer-4 activations is negative everywhere, so
    Grad-CAM's map (its positive part) is all zero, and the answer says so (no marked area, nothing hidden)."""
    melanoma = CLASS_NAMES.index("Melanoma")
    payload = explain.explanation_payload(predictor, photo, melanoma, "gradcam", "Low")["explanation"]
    attribution = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload["attribution_png"]))))
    assert attribution.max() == 0
    check = payload["check"]
    assert check["marked_hidden"] == check["random_hidden"] == check["probability"]


def test_lime_fields(lime_payload: dict) -> None:
    fields = lime_payload["explanation"]
    assert (fields["method"], fields["precision"]) == ("lime", "Low")
    assert fields["num_samples"] == explain.PRECISION_SETTINGS["Low"].num_samples
    assert 0 < len(fields["regions"]) <= explain.TOP_REGIONS
    for region in fields["regions"]:
        assert type(region["segment"]) is int and type(region["weight"]) is float
        assert math.isfinite(region["weight"]) and region["weight"] > 0
    weights = [region["weight"] for region in fields["regions"]]
    assert weights == sorted(weights, reverse=True)


@pytest.mark.parametrize("method", ["gradcam", "gradient"])
def test_heatmap_fields(method: str, request: pytest.FixtureRequest) -> None:
    fields = request.getfixturevalue(f"{method}_payload")["explanation"]
    assert (fields["method"], fields["precision"], fields["num_samples"], fields["regions"]) == (method, None, 0, [])


def without_seconds(payload: dict) -> dict:
    return {**payload, "explanation": {k: v for k, v in payload["explanation"].items() if k != "seconds"}}


def test_lime_is_deterministic_per_seed(predictor: Predictor, photo: Image.Image, lime_payload: dict) -> None:
    again = explain.explain_lime(predictor, photo, LABEL, "Low", seed=3)
    assert without_seconds(explain.payload_from(predictor, photo, again, seed=3)) == without_seconds(lime_payload)
    assert again.marked.shape == predictor.image_size and set(np.unique(again.marked)) == {False, True}
    assert again.score is not None and math.isfinite(again.score)


def test_segmentation_covers_the_input_with_consecutive_labels(predictor: Predictor, photo: Image.Image) -> None:
    pixels = resize(photo, predictor.image_size).permute(1, 2, 0).numpy()
    for settings in explain.PRECISION_SETTINGS.values():
        segments = explain.segment(pixels, settings.n_segments)
        assert segments.shape == predictor.image_size
        np.testing.assert_array_equal(np.unique(segments), np.arange(segments.max() + 1))


def test_higher_precision_means_more_samples() -> None:
    counts = [explain.PRECISION_SETTINGS[level].num_samples for level in ("Low", "Medium", "High")]
    assert counts == sorted(set(counts))


def test_precisions_use_their_configured_sample_counts(
    predictor: Predictor, photo: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny sample counts keep this fast; the point is that each level's count reaches lime.
    settings = {level: explain.LimeSettings(num_samples=12 + i, n_segments=s.n_segments)
                for i, (level, s) in enumerate(explain.PRECISION_SETTINGS.items())}
    monkeypatch.setattr(explain, "PRECISION_SETTINGS", settings)
    calls = []
    original = predictor.probabilities

    def counting(inputs, batch_size=64, bfloat16=False, calibrated=True):
        calls.append(len(inputs))
        return original(inputs, batch_size, bfloat16, calibrated)

    monkeypatch.setattr(predictor, "probabilities", counting)
    for level, expected in settings.items():
        calls.clear()
        result = explain.explain_lime(predictor, photo, LABEL, level)
        assert result.num_samples == expected.num_samples == sum(calls)


@pytest.mark.parametrize("method", [explain.explain_gradcam, explain.explain_gradient])
def test_heatmaps_mark_their_top_fifth(predictor: Predictor, photo: Image.Image, method) -> None:
    result = method(predictor, photo, LABEL)
    assert result.attribution.shape == result.marked.shape == predictor.image_size
    assert result.attribution.dtype == np.float32 and result.marked.dtype == bool
    assert 0 < result.marked.mean() <= explain.MARKED_SHARE + 0.001
    assert result.attribution[result.marked].min() >= result.attribution[~result.marked].max()


@pytest.mark.parametrize(
    ("method", "precision", "label"),
    [("lime", "Extreme", LABEL), ("gradcam", "low", LABEL), ("shap", "Low", LABEL), ("lime", "Low", len(CLASS_NAMES)),
     ("gradcam", "Low", -1), ("gradient", "Low", len(CLASS_NAMES))],
)
def test_invalid_arguments_raise_value_error(
    predictor: Predictor, photo: Image.Image, method: str, precision: str, label: int
) -> None:
    with pytest.raises(ValueError):
        explain.explanation_payload(predictor, photo, label, method, precision)


def test_a_portrait_photos_overlay_lands_where_the_model_looked(predictor: Predictor) -> None:
    """A portrait photo is turned a quarter to the model's landscape input; its explanation is turned back onto it."""
    pixels = np.full((400, 300, 3), 90, dtype=np.uint8)
    pixels[20:80, 200:280] = 250  # a bright patch near the top right of the portrait photo
    photo = Image.fromarray(pixels)
    small = resize(photo, predictor.image_size)
    assert tuple(small.shape[-2:]) == predictor.image_size
    heat = (small[0].numpy() > 170).astype(np.float32)  # the patch, wherever the turn put it in the model input
    drawn, attribution = explain.render(photo, explain.Explanation("gradcam", None, 0, CLASS_NAMES[LABEL], 0.0, heat,
                                                                   heat > 0, []))
    assert drawn.shape == (400, 300, 3) and attribution.shape == (400, 300)
    changed = np.abs(drawn.astype(int) - pixels.astype(int)).sum(-1) > 30
    inside, outside = changed[25:75, 205:275].mean(), changed[150:, :150].mean()
    assert inside > 0.9 and outside == 0
    assert attribution[25:75, 205:275].min() > 200 and attribution[150:, :150].max() == 0


def test_full_size_originals_are_explained_at_their_own_size(predictor: Predictor, original_photo: Path) -> None:
    photo = Image.open(original_photo)
    photo.load()
    for method in ("lime", "gradcam", "gradient"):
        png = explain.explanation_payload(predictor, photo, LABEL, method, "Low")["explanation"]["image_png"]
        assert Image.open(io.BytesIO(base64.b64decode(png))).size == photo.size == (600, 450)
