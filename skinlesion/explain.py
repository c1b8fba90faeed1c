"""Why the model chose a class: LIME superpixel explanations and Grad-CAM heatmaps, drawn on the uploaded photo.

Both methods work at the model's input resolution (the photo resized exactly as for prediction), so
every perturbed image LIME asks about is one forward pass at 108x144 and nothing else; only the
finished overlay goes back to the photo's own size.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from lime import lime_image
from PIL import Image
from skimage.segmentation import mark_boundaries, slic

from skinlesion.admission import DeadlinePassed
from skinlesion.image import normalize, quarter_turns, resize
from skinlesion.model import CLASS_NAMES
from skinlesion.options import METHODS
from skinlesion.predictor import Predictor, native_bfloat16


@dataclass(frozen=True)
class LimeSettings:
    num_samples: int
    # SLIC's target superpixel count at the model input resolution (108x144).
    n_segments: int


# Chosen by measurement (mid-training resnet34 checkpoint from model_store, HAM10000 photos, explained class =
# the prediction). Stability = mean pairwise IoU of the top-5-region masks over 3 seeds, averaged over
# photos; time = forward passes (~23 ms CPU per sample on one core, measured under load). Coarser regions where
# fewer samples can support fewer features:
#   SLIC 25 (~24 regions):   150 samples 0.79, 300 0.83, 500 0.88, 1000 0.95 (5 photos)
#   SLIC 50 (~47 regions):   150 samples 0.74, 300 0.84, 500 0.79, 1000 0.96 (5 photos)
#   SLIC 100 (~105 regions): 150 samples 0.67, 500 0.81 (5 photos), 1000 0.90 (8 runs), 1500 1.00 and 2000 1.00 (3 photos)
# Low: the coarsest regions, the most stable at few samples; 150 samples answer in ~3.5 s on one core.
# Medium: 0.79 against the 0.6 target, ~12 s on one core. High: 1500 samples at the finest regions, 1.00
# on 3 photos against the 0.8 target (1000 was 0.90, photos as low as 0.76), ~35 s on one core.
# lime's defaults on the full-size photo (quickshift, ~215 regions), two of the same photos: 0.54 at 150
# samples, 0.77 at 500, 0.89 at 1000; these settings on those photos: Low 0.83, Medium 0.75, High's
# regions at 1000 samples 0.91. About as stable per sample, better at Low, at a fraction of the time.
PRECISION_SETTINGS: dict[str, LimeSettings] = {
    "Low": LimeSettings(num_samples=150, n_segments=25),
    "Medium": LimeSettings(num_samples=500, n_segments=50),
    "High": LimeSettings(num_samples=1500, n_segments=100),
}
# Perturbed images per forward pass. resnet34 at 108x144, one torch thread (as a serving worker runs),
# CPU ms per image for batch 32/64/128: 22.9/22.7/23.6, peak memory +73/+139/+272 MiB: 64 is as fast
# as any and bounded in memory. (bench/explain.py prints the same table for the machine it runs on.)
LIME_BATCH_SIZE = 64
# None = lime's default: a hidden superpixel takes its own mean colour. Measured against hiding with the
# ImageNet mean grey (an all-zero network input) on a HAM10000 photo, resnet34, 47 superpixels, 1000
# samples, 3 seeds: top-5 IoU across seeds 1.00 vs 0.65 and local-model R^2 0.97 vs 0.76. Grey patches
# are far outside the training photos, so the network reacts to them non-linearly.
HIDE_COLOR = None
# As the original project drew it: lime's get_image_and_mask(positive_only=True, num_features=5).
TOP_REGIONS = 5
EXPLAIN_MAX_SIDE = 300
PNG_MAX_SIDE = 1024
# zlib level 1: a 600x450 overlay encodes in 30 ms to 263 KiB, against 139 ms and 215 KiB at the default 6.
PNG_COMPRESSION = 1
# Grad-CAM overlay: how strongly the hottest pixels are tinted; cold pixels keep the photo as is.
HEATMAP_OPACITY = 0.6


@dataclass(frozen=True)
class Explanation:
    method: str
    precision: str | None
    num_samples: int
    label: str
    seconds: float
    # At the model input resolution (H x W): LIME, 1 where a supporting region lies, else 0 (uint8);
    # Grad-CAM, the heatmap scaled to [0, 1] (float32).
    mask: np.ndarray
    # LIME: the supporting superpixels, strongest first, as {"segment": id, "weight": coefficient}.
    regions: list[dict]
    # LIME's weighted R^2 of its local linear model (how faithful the explanation is); None for Grad-CAM.
    score: float | None = None


def lime_settings(precision: str) -> LimeSettings:
    if precision not in PRECISION_SETTINGS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_SETTINGS)}")
    return PRECISION_SETTINGS[precision]


def check_label(label: int) -> None:
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label {label} is not a class index (0-{len(CLASS_NAMES) - 1})")


def segment(image: np.ndarray, n_segments: int) -> np.ndarray:
    """SLIC superpixels labelled 0..K-1 (deterministic: SLIC has no random state)."""
    labels = slic(image, n_segments=n_segments, compactness=10.0, start_label=0)
    # lime treats the labels as feature indices 0..K-1, so any gap would be a feature it never hides.
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)


def explain_lime(predictor: Predictor, image: Image.Image, label: int, precision: str, seed: int = 0,
                 until: float | None = None) -> Explanation:
    """LIME for class `label` of an RGB image: which superpixels raise that class's probability. Past `until`
    (a time.time()), the next batch of perturbed images raises DeadlinePassed instead of running."""
    settings = lime_settings(precision)
    check_label(label)
    started = time.perf_counter()
    small = resize(image, predictor.image_size, predictor.colour_constancy).permute(1, 2, 0).numpy()

    def classify(images: np.ndarray) -> np.ndarray:
        if until is not None and time.time() > until:
            raise DeadlinePassed
        # lime hands over N x H x W x 3 uint8 images; the serving normalization turns them into model input.
        batch = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
        # The network's own softmax: a temperature per predicted class would make the explained probability jump
        # where a perturbation changes the top class, and nevi's (below 1) saturate it (docs/explanations.md).
        return predictor.probabilities(batch, LIME_BATCH_SIZE, bfloat16=native_bfloat16(predictor.device.type),
                                       calibrated=False).numpy()

    # The explainer's random_state draws the perturbations; random_seed alone would only seed segmentation.
    explainer = lime_image.LimeImageExplainer(random_state=seed)
    result = explainer.explain_instance(
        small,
        classify,
        labels=(label,),
        top_labels=None,
        hide_color=HIDE_COLOR,
        num_samples=settings.num_samples,
        batch_size=LIME_BATCH_SIZE,
        segmentation_fn=lambda pixels: segment(pixels, settings.n_segments),
        random_seed=seed,
    )
    _, mask = result.get_image_and_mask(label, positive_only=True, num_features=TOP_REGIONS, hide_rest=False)
    regions = [{"segment": int(f), "weight": float(w)} for f, w in result.local_exp[label] if w > 0][:TOP_REGIONS]
    return Explanation(
        method="lime",
        precision=precision,
        num_samples=settings.num_samples,
        label=CLASS_NAMES[label],
        seconds=time.perf_counter() - started,
        mask=mask.astype(np.uint8),
        regions=regions,
        score=float(result.score),
    )


def explain_gradcam(predictor: Predictor, image: Image.Image, label: int) -> Explanation:
    """Grad-CAM for class `label` on the last convolutional block (layer4), upsampled to the input size."""
    check_label(label)
    started = time.perf_counter()
    inputs = predictor.preprocess(image).unsqueeze(0).to(predictor.device)
    # Gradients are the method: turn them back on if the caller runs inside torch.no_grad().
    with torch.enable_grad():
        attribution = LayerGradCam(predictor.model, predictor.model.layer4).attribute(inputs, target=label)
    heat = LayerAttribution.interpolate(attribution.detach(), predictor.image_size, "bilinear")[0, 0].relu()
    peak = float(heat.max())
    # A class with no positive evidence anywhere gets an empty heatmap rather than a division by zero.
    heatmap = (heat / peak if peak > 0 else heat).cpu().numpy().astype(np.float32)
    return Explanation(
        method="gradcam",
        precision=None,
        num_samples=0,
        label=CLASS_NAMES[label],
        seconds=time.perf_counter() - started,
        mask=heatmap,
        regions=[],
    )


def jet(values: np.ndarray) -> np.ndarray:
    """The classic jet colour map (blue-cyan-yellow-red) for values in [0, 1], as H x W x 3 floats."""
    return np.clip(1.5 - np.abs(4.0 * values[..., None] - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def render_overlay(image: Image.Image, explanation: Explanation) -> np.ndarray:
    """The explanation drawn on `image`, at its size (H x W x 3 uint8)."""
    photo = np.asarray(image.convert("RGB"))
    # The mask is in the model input's orientation: a portrait photo was turned a quarter to get there.
    turned = Image.fromarray(np.ascontiguousarray(np.rot90(
        explanation.mask, -quarter_turns(image.height, image.width, explanation.mask.shape))))
    if explanation.method == "lime":
        # Nearest neighbour keeps the mask binary, so the outline follows the superpixels' edges.
        mask = np.asarray(turned.resize(image.size, Image.Resampling.NEAREST))
        drawn = mark_boundaries(photo, mask, color=(0, 1, 0))
    else:
        heat = np.asarray(turned.resize(image.size, Image.Resampling.BILINEAR))
        alpha = HEATMAP_OPACITY * np.clip(heat, 0.0, 1.0)[..., None]
        drawn = (1.0 - alpha) * (photo / 255.0) + alpha * jet(heat)
    return np.round(drawn * 255.0).astype(np.uint8)


def shrink(pixels: np.ndarray, max_side: int) -> Image.Image:
    """An H x W x 3 uint8 array as an image whose longer side is at most `max_side` (never enlarged)."""
    picture = Image.fromarray(pixels)
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return picture


def payload_from(image: Image.Image, explanation: Explanation) -> dict:
    """The JSON-ready response additions for a finished explanation of `image` (plain Python types only)."""
    started = time.perf_counter()
    # Drawn on a copy no larger than the PNG it returns: drawing happens in float64, 24 bytes a pixel.
    photo = image.convert("RGB")
    photo.thumbnail((PNG_MAX_SIDE, PNG_MAX_SIDE), Image.Resampling.LANCZOS)
    overlay = render_overlay(photo, explanation)
    png = io.BytesIO()
    Image.fromarray(overlay).save(png, format="PNG", compress_level=PNG_COMPRESSION)
    explain = np.asarray(shrink(overlay, EXPLAIN_MAX_SIDE)).tolist()
    return {
        "explain": explain,
        "explanation": {
            "method": explanation.method,
            "precision": explanation.precision,
            "num_samples": explanation.num_samples,
            "label": explanation.label,
            # What the client waited for: the attribution plus drawing and encoding it.
            "seconds": round(explanation.seconds + time.perf_counter() - started, 3),
            "image_png": base64.b64encode(png.getvalue()).decode("ascii"),
            "regions": explanation.regions,
        },
    }


def explanation_payload(
    predictor: Predictor, image: Image.Image, label: int, method: str, precision: str, seed: int = 0,
    until: float | None = None,
) -> dict:
    """Explain class `label` of an RGB image with `method` ("lime" or "gradcam") as the response additions.

    `precision` is validated for both methods (the request always carries one) but only LIME uses it, and
    only LIME, which runs for seconds, stops at `until` (Grad-CAM is one backward pass).
    """
    lime_settings(precision)
    if method == "lime":
        explanation = explain_lime(predictor, image, label, precision, seed, until)
    elif method == "gradcam":
        explanation = explain_gradcam(predictor, image, label)
    else:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    return payload_from(image, explanation)
