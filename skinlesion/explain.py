"""Why the model gives a class: gradient and Grad-CAM heatmaps and LIME superpixel explanations, drawn on the
uploaded photo, with the attribution map itself and a self-check of what hiding the highlighted area does.

Every method works at the model's input resolution (the photo resized exactly as for prediction), so every
perturbed image LIME asks about is one forward pass at 108x144 and nothing else; only the finished overlay and
map go back to the photo's own size.
"""

from __future__ import annotations

import base64
import gc
import io
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from skimage.segmentation import mark_boundaries, slic
from torchvision.transforms.v2 import functional as F

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
# Heatmap overlays (gradient, Grad-CAM): how strongly the hottest pixels are tinted; cold pixels keep the photo as is.
HEATMAP_OPACITY = 0.6
# A heatmap's marked area (outlined on the overlay, hidden by the self-check): its top fifth, about the area of
# LIME Low's five regions of some 24.
MARKED_SHARE = 0.2
# The fast method's baseline (and bench/faithfulness.py's "blur" fill): a Gaussian blur of this many pixels of the
# 108x144 model input, which wipes out a lesion's texture and borders but keeps the colours around.
BLUR_SIGMA = 10.0
# The fast method's per-pixel estimates are smoothed by a Gaussian of this many pixels: one pixel's gradient is
# noise, a lesion's structure is a few pixels across. Chosen on the selection photos against averaging them over
# 100 or 200 superpixels (docs/explanations.md).
GRADIENT_SMOOTHING = 3.0


class DeadlinePassed(Exception):
    """Raised inside an explanation once its deadline has passed; the work done so far is dropped."""


@dataclass(frozen=True)
class Explanation:
    method: str
    precision: str | None
    num_samples: int
    label: str
    seconds: float
    # At the model input resolution (H x W, float32): how much each pixel supports the class, in the method's own
    # units (LIME: its superpixel's weight); positive = for the class.
    attribution: np.ndarray
    # The overlay's highlighted area (H x W, bool): what the answer's self-check hides.
    marked: np.ndarray
    # LIME: the supporting superpixels, strongest first, as {"segment": id, "weight": coefficient}.
    regions: list[dict]
    # LIME's weighted R^2 of its local linear model (how faithful the explanation is); None for the others.
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

    # Imported on first use, as captum below: they take seconds to import, which every worker of the plain-prediction
    # pool would pay at each start without ever explaining.
    from lime import lime_image

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
    weights = np.zeros(int(result.segments.max()) + 1, dtype=np.float32)
    for feature, weight in result.local_exp[label]:
        weights[feature] = weight
    return Explanation(
        method="lime",
        precision=precision,
        num_samples=settings.num_samples,
        label=CLASS_NAMES[label],
        seconds=time.perf_counter() - started,
        attribution=weights[result.segments],
        marked=mask.astype(bool),
        regions=regions,
        score=float(result.score),
    )


def explain_gradcam(predictor: Predictor, image: Image.Image, label: int) -> Explanation:
    """Grad-CAM for class `label` on the last convolutional block (layer4), upsampled to the input size."""
    from captum.attr import LayerAttribution, LayerGradCam

    check_label(label)
    started = time.perf_counter()
    inputs = predictor.preprocess(image).unsqueeze(0).to(predictor.device)
    # Gradients are the method: turn them back on if the caller runs inside torch.no_grad().
    with torch.enable_grad():
        attribution = LayerGradCam(predictor.model, predictor.model.layer4).attribute(inputs, target=label)
    heat = LayerAttribution.interpolate(attribution.detach(), predictor.image_size, "bilinear")[0, 0]
    return heatmap("gradcam", label, heat.cpu().numpy().astype(np.float32), started)


def explain_gradient(predictor: Predictor, image: Image.Image, label: int) -> Explanation:
    """Gradient x (input - its blur) for class `label`'s logit, summed over the colours and smoothed: a first-order
    estimate, from one forward and one backward pass, of how much blurring each area away lowers the class's score
    (bench/faithfulness.py chose it, docs/explanations.md)."""
    check_label(label)
    started = time.perf_counter()
    small = resize(image, predictor.image_size, predictor.colour_constancy)
    inputs = normalize(small).unsqueeze(0).to(predictor.device, memory_format=torch.channels_last)
    baseline = normalize(blurred(small)).unsqueeze(0).to(predictor.device)
    # Gradients are the method: turn them back on if the caller runs inside torch.no_grad().
    with torch.enable_grad():
        inputs.requires_grad_(True)
        (gradient,) = torch.autograd.grad(predictor.model(inputs)[0, label], inputs)
    per_pixel = (gradient * (inputs.detach() - baseline)).sum(1).cpu()
    return heatmap("gradient", label, gaussian(per_pixel, GRADIENT_SMOOTHING)[0].numpy().astype(np.float32), started)


def heatmap(method: str, label: int, attribution: np.ndarray, started: float) -> Explanation:
    """A heatmap method's explanation (no samples, no regions), its top MARKED_SHARE marked; `started` is when its
    work began (time.perf_counter())."""
    return Explanation(method=method, precision=None, num_samples=0, label=CLASS_NAMES[label],
                       seconds=time.perf_counter() - started, attribution=attribution,
                       marked=top_area(attribution, MARKED_SHARE), regions=[])


def top_area(attribution: np.ndarray, share: float) -> np.ndarray:
    """The pixels whose attribution is positive and among the highest `share` of all (bool, H x W). A map constant over
    regions is marked region by region, so the last region marked may take the area a little over `share`."""
    count = round(share * attribution.size)
    threshold = np.partition(attribution.ravel(), -count)[-count] if count else np.inf
    return (attribution >= threshold) & (attribution > 0)


def moved(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """`values` (H x W) moved by a random offset of a quarter to three quarters of the height and of the width,
    wrapping around the edges: the same shape and size somewhere else."""
    rng = np.random.default_rng(seed)
    height, width = values.shape
    offset = (int(rng.integers(height // 4, 3 * height // 4 + 1)), int(rng.integers(width // 4, 3 * width // 4 + 1)))
    return np.roll(values, offset, axis=(0, 1))


def gaussian(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of `sigma` pixels (C x H x W, float), three sigmas wide either side."""
    kernel = 2 * round(3 * sigma) + 1
    return F.gaussian_blur(images, [kernel, kernel], [sigma, sigma])


def blurred(small: torch.Tensor) -> torch.Tensor:
    """The model input (uint8, 3 x H x W) blurred past recognition (float): the fast method's baseline."""
    return gaussian(small.float(), BLUR_SIGMA)


def mean_colour(small: torch.Tensor) -> torch.Tensor:
    """The model input (uint8, 3 x H x W) painted all in its mean colour (float): what the self-check hides with (and
    bench/faithfulness.py's "mean" fill), no method's own way of hiding."""
    pixels = small.float()
    return pixels.mean(dim=(1, 2), keepdim=True).expand_as(pixels)


def self_check(predictor: Predictor, image: Image.Image, label: int, marked: np.ndarray, seed: int = 0,
               stated: float | None = None) -> dict:
    """The class's calibrated probability for the photo (`stated`: as the answer already gives it, else computed
    here), for the photo with the `marked` area hidden (painted in the photo's mean colour) and with the same area
    moved to a random place hidden."""
    small = resize(image, predictor.image_size, predictor.colour_constancy)
    areas = [marked, moved(marked, seed)] if stated is not None else [np.zeros_like(marked), marked, moved(marked, seed)]
    inputs = normalize(torch.where(torch.from_numpy(np.stack(areas))[:, None], mean_colour(small), small.float()))
    # The test-time views and trunk dtype of the answer's own prediction, so the three are comparable with it.
    logits = predictor.outputs(inputs, bfloat16=predictor.bfloat16, statistics=False, views=predictor.views).logits
    probabilities = predictor.calibrated(logits)[:, label].tolist()
    probability, marked_hidden, random_hidden = [stated, *probabilities] if stated is not None else probabilities
    return {"probability": probability, "marked_hidden": marked_hidden, "random_hidden": random_hidden}


def jet(values: np.ndarray) -> np.ndarray:
    """The classic jet colour map (blue-cyan-yellow-red) for values in [0, 1], as H x W x 3 floats."""
    return np.clip(1.5 - np.abs(4.0 * values[..., None] - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def support(attribution: np.ndarray) -> np.ndarray:
    """The attribution's positive part scaled to [0, 1] by its peak; all 0 where nothing supports the class."""
    positive = np.clip(attribution, 0.0, None).astype(np.float32)
    peak = float(positive.max())
    return positive / peak if peak > 0 else positive


def on_photo(values: np.ndarray, image: Image.Image, resample: Image.Resampling) -> np.ndarray:
    """A map at the model input (float32 or bool) brought to `image`: turned back as the photo was turned to reach
    the input (a portrait photo is turned a quarter), and resized to its size."""
    turned = np.ascontiguousarray(np.rot90(values, -quarter_turns(image.height, image.width, values.shape)))
    if turned.dtype == bool:
        return np.asarray(Image.fromarray(turned.astype(np.uint8)).resize(image.size, resample)).astype(bool)
    return np.asarray(Image.fromarray(turned.astype(np.float32)).resize(image.size, resample))


def render(image: Image.Image, explanation: Explanation) -> tuple[np.ndarray, np.ndarray]:
    """The overlay (H x W x 3 uint8) and the attribution (H x W uint8, 255 = the strongest support) at `image`'s size.

    LIME: the marked superpixels outlined in green, the attribution constant per superpixel. Heatmaps: the support
    tinted over the photo (cold pixels keep the photo as is), the marked area outlined in white.
    """
    photo = np.asarray(image.convert("RGB"))
    # Nearest neighbour keeps LIME's superpixels and every marked area sharp-edged.
    sharp = explanation.method == "lime"
    # Scaled at the photo's size, so that 255 is the strongest support there too.
    heat = support(on_photo(explanation.attribution.astype(np.float32), image,
                            Image.Resampling.NEAREST if sharp else Image.Resampling.BILINEAR))
    marked = on_photo(explanation.marked, image, Image.Resampling.NEAREST)
    if sharp:
        drawn = mark_boundaries(photo, marked, color=(0, 1, 0))
    else:
        alpha = HEATMAP_OPACITY * heat[..., None]
        drawn = mark_boundaries((1.0 - alpha) * (photo / 255.0) + alpha * jet(heat), marked, color=(1, 1, 1))
    return np.round(drawn * 255.0).astype(np.uint8), np.round(heat * 255.0).astype(np.uint8)


def shrink(pixels: np.ndarray, max_side: int) -> Image.Image:
    """An H x W x 3 uint8 array as an image whose longer side is at most `max_side` (never enlarged)."""
    picture = Image.fromarray(pixels)
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return picture


def nested_lists(pixels: np.ndarray) -> list:
    """The array as nested lists, built with the garbage collector paused: its tens of thousands of small lists would
    otherwise set off a full collection over all of a worker's objects (torch's, lime's), 0.25 s here."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return pixels.tolist()
    finally:
        if paused:
            gc.enable()


def png_base64(pixels: np.ndarray) -> str:
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG", compress_level=PNG_COMPRESSION)
    return base64.b64encode(png.getvalue()).decode("ascii")


def payload_from(predictor: Predictor, image: Image.Image, explanation: Explanation, seed: int = 0,
                 stated: float | None = None) -> dict:
    """The JSON-ready response additions for a finished explanation of `image`, with its self-check (plain Python
    types only)."""
    started = time.perf_counter()
    check = self_check(predictor, image, CLASS_NAMES.index(explanation.label), explanation.marked, seed, stated)
    # Drawn on a copy no larger than the PNG it returns: drawing happens in float64, 24 bytes a pixel.
    photo = image.convert("RGB")
    photo.thumbnail((PNG_MAX_SIDE, PNG_MAX_SIDE), Image.Resampling.LANCZOS)
    overlay, attribution = render(photo, explanation)
    return {
        "explain": nested_lists(np.asarray(shrink(overlay, EXPLAIN_MAX_SIDE))),
        "explanation": {
            "method": explanation.method,
            "precision": explanation.precision,
            "num_samples": explanation.num_samples,
            "label": explanation.label,
            # What the client waited for: the attribution, its check, drawing and encoding.
            "seconds": round(explanation.seconds + time.perf_counter() - started, 3),
            "image_png": png_base64(overlay),
            "attribution_png": png_base64(attribution),
            "regions": explanation.regions,
            "check": check,
        },
    }


def explanation_payload(
    predictor: Predictor, image: Image.Image, label: int, method: str, precision: str, seed: int = 0,
    until: float | None = None, stated: float | None = None,
) -> dict:
    """Explain class `label` of an RGB image with `method` ("lime", "gradcam" or "gradient") as the response additions.

    `precision` is validated for every method (the request always carries one) but only LIME uses it, and only LIME,
    which runs for seconds, stops at `until` (the others are one backward pass). `seed` seeds LIME and the check's
    random area; `stated` is the class's probability as the answer gives it (the check computes it otherwise).
    """
    lime_settings(precision)
    if method == "lime":
        explanation = explain_lime(predictor, image, label, precision, seed, until)
    elif method == "gradcam":
        explanation = explain_gradcam(predictor, image, label)
    elif method == "gradient":
        explanation = explain_gradient(predictor, image, label)
    else:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    return payload_from(predictor, image, explanation, seed, stated)
