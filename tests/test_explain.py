"""Explanations on a real full-size photo with a real (random-weight) ResNet: shapes, types, determinism, errors."""

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

LABEL = 4


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


@pytest.fixture(params=["lime", "gradcam"])
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
    assert set(payload["explanation"]) == {"method", "precision", "num_samples", "label", "seconds", "image_png", "regions"}
    assert payload["explanation"]["label"] == CLASS_NAMES[LABEL]
    assert payload["explanation"]["seconds"] > 0


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


def test_gradcam_fields(gradcam_payload: dict) -> None:
    fields = gradcam_payload["explanation"]
    assert (fields["method"], fields["precision"], fields["num_samples"], fields["regions"]) == ("gradcam", None, 0, [])


def without_seconds(payload: dict) -> dict:
    return {**payload, "explanation": {k: v for k, v in payload["explanation"].items() if k != "seconds"}}


def test_lime_is_deterministic_per_seed(predictor: Predictor, photo: Image.Image, lime_payload: dict) -> None:
    again = explain.explain_lime(predictor, photo, LABEL, "Low", seed=3)
    assert without_seconds(explain.payload_from(photo, again)) == without_seconds(lime_payload)
    assert again.mask.shape == predictor.image_size and set(np.unique(again.mask)) == {0, 1}
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


def test_gradcam_heatmap_is_normalized(predictor: Predictor, photo: Image.Image) -> None:
    result = explain.explain_gradcam(predictor, photo, LABEL)
    assert result.mask.shape == predictor.image_size and result.mask.dtype == np.float32
    assert result.mask.min() >= 0 and result.mask.max() <= 1


@pytest.mark.parametrize(
    ("method", "precision", "label"),
    [("lime", "Extreme", LABEL), ("gradcam", "low", LABEL), ("shap", "Low", LABEL), ("lime", "Low", len(CLASS_NAMES)),
     ("gradcam", "Low", -1)],
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
    drawn = explain.render_overlay(photo, explain.Explanation("gradcam", None, 0, CLASS_NAMES[LABEL], 0.0, heat, []))
    assert drawn.shape == (400, 300, 3)
    changed = np.abs(drawn.astype(int) - pixels.astype(int)).sum(-1) > 30
    inside, outside = changed[25:75, 205:275].mean(), changed[150:, :150].mean()
    assert inside > 0.9 and outside == 0


def test_full_size_originals_are_explained_at_their_own_size(predictor: Predictor, original_photo: Path) -> None:
    photo = Image.open(original_photo)
    photo.load()
    for method in ("lime", "gradcam"):
        png = explain.explanation_payload(predictor, photo, LABEL, method, "Low")["explanation"]["image_png"]
        assert Image.open(io.BytesIO(base64.b64decode(png))).size == photo.size == (600, 450)
