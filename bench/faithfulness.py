"""How faithful each explanation method is to the model, on full-size photos: deletion and insertion curves, two
random baselines, a randomised-weights sanity check, the time per explanation and the answer's self-check (issue 38).

    .venv/bin/python bench/faithfulness.py [--per-class 8] [--set selection|report|all] [--methods a,b,...] [--save F]

Photos: per true class, `--per-class` of the full-size photos spread evenly over the model's confidence (so the
unsure ones are in), alternately put in a selection set (where the served fast method was chosen among the
candidates) and a report set.

Curves: the photo at the model's input size, its pixels removed (deletion) or revealed (insertion) in order of
attribution in 16 equal steps, each step scored by the network's softmax for the explained class (the predicted
one). A removed pixel takes the photo blurred past recognition (the fast method's own baseline) or the photo's mean
colour (no served method's own). Area = mean of the curve over its 17 points: deletion lower is better, insertion
higher. Baselines, counted on the photos where random deletion moves the probability by at least 0.05: "random",
pixels in a random order of 8x8-pixel blocks (three seeds); "moved", the method's own map moved to a random place
(two seeds), the same shapes elsewhere, as the self-check does. "vs X" = photos whose deletion area is below X's.
Sanity (Adebayo et al. 2018): Spearman correlation of a method's maps of the trained model and of the same
network freshly initialised; near 0 is what a method that reads the model shows.
Time: median seconds per attribution on one torch thread (as a serving worker runs), LIME Low in the same run; for
the served methods also the whole explanation (with the self-check, drawing and encoding) and the self-check.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Before lime imports tqdm, which reads it then: lime draws a progress bar per explanation.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torch.nn.functional as nnf
from lime import lime_image
from PIL import Image
from scipy.stats import spearmanr

from skinlesion import explain
from skinlesion.image import IMAGENET_MEAN, normalize, resize
from skinlesion.model import CLASS_CODES, CLASS_NAMES, build_model
from skinlesion.predictor import Predictor, native_bfloat16

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16
RANDOM_SEEDS = 3
RANDOM_BLOCK = 8
MOVED_SEEDS = 2
MIN_CHANGE = 0.05
UNSURE = 0.6


@dataclass(frozen=True)
class Photo:
    name: str
    code: str  # the dermatologists' class
    image: Image.Image
    label: int  # the predicted class: the one explained
    probability: float  # its calibrated probability
    part: str  # "selection" or "report"


def choose_photos(predictor: Predictor, folder: Path, per_class: int) -> list[Photo]:
    """Per true class, `per_class` photos evenly spaced in the model's confidence, alternately selection and report."""
    rows = list(csv.DictReader((folder / "metadata.csv").open()))
    photos = []
    for code in CLASS_CODES:
        scored = []
        for row in sorted((r for r in rows if r["dx"] == code), key=lambda r: r["image_id"]):
            image = Image.open(folder / f"{row['image_id']}.jpg").convert("RGB")
            answer = predictor.predict([image])[0]
            scored.append((answer["probability"], row["image_id"], image, CLASS_NAMES.index(answer["prediction"])))
        scored.sort(key=lambda s: s[0])
        picks = np.unique(np.linspace(0, len(scored) - 1, min(per_class, len(scored))).round().astype(int))
        for rank, index in enumerate(picks):
            probability, name, image, label = scored[index]
            photos.append(Photo(name, code, image, label, probability, "selection" if rank % 2 == 0 else "report"))
    return photos


def model_input(predictor: Predictor, photo: Image.Image) -> torch.Tensor:
    """The photo as the model sees it before normalising: uint8, 3 x H x W."""
    return resize(photo, predictor.image_size, predictor.colour_constancy)


def fills(small: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"blur": explain.blurred(small), "mean": explain.mean_colour(small)}


FILLS = ("blur", "mean")


def curves(predictor: Predictor, small: torch.Tensor, attribution: np.ndarray, label: int, seed: int = 0
           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per fill, the deletion and insertion curves (STEPS + 1 probabilities) in order of `attribution`, highest first;
    ties in a random order (`seed`), as a map that is constant over a region orders nothing within it."""
    order = np.lexsort((np.random.default_rng(seed).random(attribution.size), -attribution.ravel()))
    counts = np.round(np.linspace(0, attribution.size, STEPS + 1)).astype(int)
    rank = np.empty(attribution.size, dtype=np.int64)
    rank[order] = np.arange(attribution.size)
    masks = torch.from_numpy(np.stack([rank < count for count in counts]).reshape(len(counts), 1, *attribution.shape))
    pixels = small.float()
    images = []
    for fill in fills(small).values():
        images += [torch.where(masks, fill, pixels), torch.where(masks, pixels, fill)]
    probabilities = predictor.probabilities(normalize(torch.cat(images)), bfloat16=native_bfloat16(predictor.device.type),
                                            calibrated=False)[:, label].numpy()
    parts = probabilities.reshape(len(FILLS), 2, len(counts))
    return {fill: (parts[i, 0], parts[i, 1]) for i, fill in enumerate(FILLS)}


def area(curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


def random_map(shape: tuple[int, int], seed: int) -> np.ndarray:
    cells = np.random.default_rng(seed).random((-(-shape[0] // RANDOM_BLOCK), -(-shape[1] // RANDOM_BLOCK)))
    return np.kron(cells, np.ones((RANDOM_BLOCK, RANDOM_BLOCK)))[: shape[0], : shape[1]]


# Methods: (predictor, photo, label) -> an Explanation (served) or a map at the model input size (candidates),
# higher = more support for `label`.
Method = Callable[[Predictor, Image.Image, int], "explain.Explanation | np.ndarray"]


def layer_gradients(predictor: Predictor, photo: Image.Image, label: int, layers: list[str], contrastive: bool = False
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(activation, gradient) at each named layer, from one forward and backward pass, of the class logit or, with
    `contrastive`, of its log-softmax (the class against the others)."""
    captured = []
    hooks = [getattr(predictor.model, name).register_forward_hook(lambda m, i, o: captured.append(o)) for name in layers]
    try:
        with torch.enable_grad():
            inputs = predictor.preprocess(photo).unsqueeze(0).to(predictor.device, memory_format=torch.channels_last)
            logits = predictor.model(inputs)[0]
            score = logits.log_softmax(0)[label] if contrastive else logits[label]
            gradients = torch.autograd.grad(score, captured)
    finally:
        for hook in hooks:
            hook.remove()
    return [(a.detach()[0], g[0]) for a, g in zip(captured, gradients, strict=True)]


def upsample(values: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return nnf.interpolate(values[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def unit(values: np.ndarray) -> np.ndarray:
    peak = np.abs(values).max()
    return values / peak if peak > 0 else values


def cam(kind: str, layers: tuple[str, ...], contrastive: bool = False) -> Method:
    """Class activation maps on `layers` (averaged, each scaled to 1). HiResCAM on layer4 equals Grad-CAM there
    (global pooling then one linear layer: the gradient is the same at every position), so it is not a candidate."""
    def method(predictor: Predictor, photo: Image.Image, label: int) -> np.ndarray:
        maps = []
        for activation, gradient in layer_gradients(predictor, photo, label, list(layers), contrastive):
            if kind == "gradcam":
                values = (gradient.mean(dim=(1, 2), keepdim=True) * activation).sum(0)
            elif kind == "hirescam":
                values = (gradient * activation).sum(0)
            elif kind == "layercam":
                values = (gradient.relu() * activation).sum(0)
            else:  # gradcam++ (Chattopadhay et al. 2018, with the exponential's closed-form second derivatives)
                g2, g3 = gradient**2, gradient**3
                denominator = 2 * g2 + activation.sum(dim=(1, 2), keepdim=True) * g3
                alpha = g2 / torch.where(denominator != 0, denominator, 1.0)
                values = ((alpha * gradient.relu()).sum(dim=(1, 2), keepdim=True) * activation).sum(0)
            maps.append(unit(upsample(values, predictor.image_size)))
        return np.mean(maps, axis=0)
    return method


def superpixels(predictor: Predictor, photo: Image.Image, n_segments: int) -> tuple[torch.Tensor, np.ndarray]:
    small = model_input(predictor, photo)
    return small, explain.segment(small.permute(1, 2, 0).numpy(), n_segments)


def pooled(values: np.ndarray, segments: np.ndarray) -> np.ndarray:
    means = np.bincount(segments.ravel(), values.ravel()) / np.bincount(segments.ravel())
    return means[segments]


def pooled_cam(n_segments: int) -> Method:
    base = cam("gradcam", ("layer3",))

    def method(predictor: Predictor, photo: Image.Image, label: int) -> np.ndarray:
        return pooled(base(predictor, photo, label), superpixels(predictor, photo, n_segments)[1])
    return method


def superpixel_means(small: torch.Tensor, segments: np.ndarray) -> torch.Tensor:
    """Each superpixel filled with its mean colour (LIME's hidden image), float 3 x H x W."""
    index = torch.from_numpy(segments.ravel())
    count = int(segments.max()) + 1
    means = torch.zeros(3, count).index_add_(1, index, small.float().flatten(1)) / torch.bincount(index, minlength=count)
    return means[:, index].reshape(small.shape)


def pooled_gradient(n_segments: int, baseline: str = "blur", contrastive: bool = False, product: bool = False) -> Method:
    """Gradient x (input - baseline), summed over the colours and averaged per superpixel: the served method
    (explain_gradient) with superpixels in place of its smoothing. Baseline: the blur, each superpixel's mean colour
    (LIME's hiding: a linearised LIME), the photo's mean colour, or the ImageNet mean grey (plain gradient x input).
    `product`: times Grad-CAM on layer4 (both positive parts, each scaled to 1)."""
    def method(predictor: Predictor, photo: Image.Image, label: int) -> np.ndarray:
        small, segments = superpixels(predictor, photo, n_segments)
        inputs = normalize(small).unsqueeze(0)
        hidden = {"blur": lambda: explain.blurred(small), "mean": lambda: explain.mean_colour(small),
                  "grey": lambda: torch.tensor(IMAGENET_MEAN)[:, None, None].expand(small.shape) * 255.0,
                  "superpixels": lambda: superpixel_means(small, segments)}[baseline]()
        with torch.enable_grad():
            inputs.requires_grad_(True)
            logits = predictor.model(inputs.contiguous(memory_format=torch.channels_last))[0]
            score = logits.log_softmax(0)[label] if contrastive else logits[label]
            (gradient,) = torch.autograd.grad(score, inputs)
        values = pooled((gradient * (inputs.detach() - normalize(hidden)[None]))[0].sum(0).numpy(), segments)
        if product:
            values = unit(values.clip(0)) * unit(cam("gradcam", ("layer4",))(predictor, photo, label).clip(0))
        return values
    return method


def occlusion(n_segments: int) -> Method:
    """Each superpixel hidden alone (its mean colour, as LIME hides it): how far the class's softmax falls."""
    def method(predictor: Predictor, photo: Image.Image, label: int) -> np.ndarray:
        small, segments = superpixels(predictor, photo, n_segments)
        pixels = small.float()
        hidden = torch.from_numpy(segments)[None] == torch.arange(int(segments.max()) + 1)[:, None, None]  # K x H x W
        images = torch.where(hidden[:, None], superpixel_means(small, segments), pixels)
        probabilities = predictor.probabilities(normalize(torch.cat([pixels[None], images])),
                                                bfloat16=native_bfloat16(predictor.device.type), calibrated=False)[:, label]
        return (probabilities[0] - probabilities[1:]).numpy()[segments]
    return method


def rise(masks: int, grid: tuple[int, int] = (6, 8), keep: float = 0.5) -> Method:
    """RISE (Petsiuk et al. 2018): the class's softmax averaged over random smooth masks, per pixel kept."""
    def method(predictor: Predictor, photo: Image.Image, label: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        height, width = predictor.image_size
        cell = (-(-height // grid[0]), -(-width // grid[1]))
        coarse = (torch.rand(masks, 1, *grid, generator=generator) < keep).float()
        big = nnf.interpolate(coarse, size=((grid[0] + 1) * cell[0], (grid[1] + 1) * cell[1]), mode="bilinear",
                              align_corners=False)
        ys = torch.randint(0, cell[0], (masks,), generator=generator)
        xs = torch.randint(0, cell[1], (masks,), generator=generator)
        weights = torch.stack([big[i, :, y:y + height, x:x + width] for i, (y, x) in enumerate(zip(ys, xs, strict=True))])
        inputs = normalize(model_input(predictor, photo)) * weights  # hidden = 0: the ImageNet mean grey
        probabilities = predictor.probabilities(inputs, bfloat16=native_bfloat16(predictor.device.type), calibrated=False)
        return (probabilities[:, label, None, None] * weights[:, 0]).sum(0).numpy() / masks
    return method


def reference_lime(predictor: Predictor, photo: Image.Image, label: int) -> np.ndarray:
    """lime's explain_instance with its defaults on the full-size photo (quickshift), at Low's sample count."""
    def classify(images: np.ndarray) -> np.ndarray:
        batch = torch.stack([predictor.preprocess(Image.fromarray(image)) for image in images])
        return predictor.probabilities(batch, calibrated=False).numpy()

    result = lime_image.LimeImageExplainer(random_state=0).explain_instance(
        np.asarray(photo), classify, labels=(label,), top_labels=None,
        num_samples=explain.PRECISION_SETTINGS["Low"].num_samples, random_seed=0)
    weights = np.zeros(int(result.segments.max()) + 1)
    for feature, weight in result.local_exp[label]:
        weights[feature] = weight
    full = torch.from_numpy(weights[result.segments]).float()[None, None]
    return nnf.interpolate(full, size=predictor.image_size, mode="area")[0, 0].numpy()


SERVED: dict[str, Method] = {
    "gradient": explain.explain_gradient,
    "gradcam": explain.explain_gradcam,
    "lime-low": lambda predictor, photo, label: explain.explain_lime(predictor, photo, label, "Low"),
    "lime-medium": lambda predictor, photo, label: explain.explain_lime(predictor, photo, label, "Medium"),
}
CANDIDATES: dict[str, Method] = {
    "gradcam-layer3": cam("gradcam", ("layer3",)),
    "gradcam-layer34": cam("gradcam", ("layer3", "layer4")),
    "gradcam-layer4-contrastive": cam("gradcam", ("layer4",), contrastive=True),
    "gradcam-layer3-contrastive": cam("gradcam", ("layer3",), contrastive=True),
    "gradcam++-layer4": cam("gradcam++", ("layer4",)),
    "hirescam-layer3": cam("hirescam", ("layer3",)),
    "layercam-layer3": cam("layercam", ("layer3",)),
    "layercam-layer234": cam("layercam", ("layer2", "layer3", "layer4")),
    "gradcam-layer3-superpixels50": pooled_cam(50),
    "gradient-superpixels50": pooled_gradient(50),
    "gradient-superpixels100": pooled_gradient(100),
    "gradient-superpixels200": pooled_gradient(200),
    "gradient-superpixels50-contrastive": pooled_gradient(50, contrastive=True),
    "gradient-superpixels50-x-gradcam": pooled_gradient(50, product=True),
    "gradient-superpixels100-grey": pooled_gradient(100, baseline="grey"),
    "gradient-superpixels100-mean": pooled_gradient(100, baseline="mean"),
    "linear-lime25": pooled_gradient(25, baseline="superpixels"),
    "linear-lime50": pooled_gradient(50, baseline="superpixels"),
    "occlusion25": occlusion(25),
    "occlusion50": occlusion(50),
    "rise32": rise(32),
}
METHODS: dict[str, Method] = {**SERVED, "lime-reference": reference_lime, **CANDIDATES}


def timed(method: Method, predictor: Predictor, photo: Image.Image, label: int
          ) -> tuple[np.ndarray, float, explain.Explanation | None]:
    """The map, the seconds it took and, for a served method, its Explanation."""
    started = time.perf_counter()
    result = method(predictor, photo, label)
    seconds = time.perf_counter() - started
    if isinstance(result, explain.Explanation):
        return result.attribution.astype(np.float64), seconds, result
    return np.asarray(result, dtype=np.float64), seconds, None


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps; 0 where either is constant (it ranks nothing)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def evaluate(predictor: Predictor, random_model: Predictor, photos: list[Photo], methods: list[str]) -> dict:
    """Per method and photo: areas per fill with the moved map's, the time, the sanity correlation and, for served
    methods, the whole explanation's time and its self-check; plus the random order's areas per photo."""
    results: dict = {name: [] for name in methods}
    results["random"] = []
    for number, photo in enumerate(photos, 1):
        small = model_input(predictor, photo.image)
        runs = [curves(predictor, small, random_map(predictor.image_size, seed), photo.label, seed)
                for seed in range(RANDOM_SEEDS)]
        means = {fill: np.mean([run[fill][0] for run in runs], axis=0) for fill in FILLS}
        results["random"].append({fill: {"deletion": np.mean([area(run[fill][0]) for run in runs]),
                                         "insertion": np.mean([area(run[fill][1]) for run in runs]),
                                         "moves": max(means[fill][0] - means[fill])}
                                  for fill in FILLS})
        for name in methods:
            attribution, seconds, explanation = timed(METHODS[name], predictor, photo.image, photo.label)
            scored = curves(predictor, small, attribution, photo.label)
            shifted = [curves(predictor, small, explain.moved(attribution, seed), photo.label) for seed in range(MOVED_SEEDS)]
            untrained, _, _ = timed(METHODS[name], random_model, photo.image, photo.label)
            result = {fill: {"deletion": area(scored[fill][0]), "insertion": area(scored[fill][1]),
                             "moved": float(np.mean([area(run[fill][0]) for run in shifted]))} for fill in FILLS}
            result.update(seconds=seconds, sanity=spearman(attribution, untrained))
            if explanation is not None:
                started = time.perf_counter()
                payload = explain.payload_from(predictor, photo.image, explanation)
                result.update(served=seconds + time.perf_counter() - started, check=payload["explanation"]["check"])
                started = time.perf_counter()
                explain.self_check(predictor, photo.image, photo.label, explanation.marked)
                result.update(check_seconds=time.perf_counter() - started)
            results[name].append(result)
        print(f"  {number}/{len(photos)} {photo.name} ({photo.code}, predicted {CLASS_CODES[photo.label]} "
              f"{photo.probability:.2f})", file=sys.stderr, flush=True)
    return results


def faithfulness_table(results: dict, methods: list[str], indices: list[int]) -> list[tuple[str, ...]]:
    rows = [("method", "s", "del blur", "del mean", "ins blur", "ins mean", "vs random blur", "vs random mean",
             "vs moved blur", "vs moved mean", "sanity rho")]
    random = [results["random"][i] for i in indices]
    for name in [*methods, "random"]:
        runs = [results[name][i] for i in indices]
        cells = [name, "-" if name == "random" else f"{statistics.median(r['seconds'] for r in runs):.3f}"]
        cells += [f"{np.mean([r[fill][kind] for r in runs]):.3f}" for kind in ("deletion", "insertion") for fill in FILLS]
        if name == "random":
            rows.append((*cells, *["-"] * 5))
            continue
        for baseline in ("random", "moved"):
            for fill in FILLS:
                moving = [(r, base) for r, base in zip(runs, random, strict=True) if base[fill]["moves"] >= MIN_CHANGE]
                wins = sum(r[fill]["deletion"] < (base[fill]["deletion"] if baseline == "random" else r[fill]["moved"])
                           for r, base in moving)
                cells.append(f"{wins}/{len(moving)}")
        cells.append(f"{np.mean([r['sanity'] for r in runs]):+.2f}")
        rows.append(tuple(cells))
    return rows


def served_table(results: dict, methods: list[str], indices: list[int]) -> list[tuple[str, ...]]:
    rows = [("method", "explanation s", "max s", "check s", "probability", "marked hidden", "random hidden",
             "marked below random")]
    for name in methods:
        runs = [results[name][i] for i in indices]
        if "served" not in runs[0]:
            continue
        checks = [r["check"] for r in runs]
        rows.append((name, f"{statistics.median(r['served'] for r in runs):.3f}", f"{max(r['served'] for r in runs):.3f}",
                     f"{statistics.median(r['check_seconds'] for r in runs):.3f}",
                     *(f"{np.mean([c[key] for c in checks]):.3f}" for key in ("probability", "marked_hidden", "random_hidden")),
                     f"{sum(c['marked_hidden'] < c['random_hidden'] for c in checks)}/{len(checks)}"))
    return rows


def print_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) if i else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths, strict=True))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=8, help="photos per true class (all of a class that has fewer)")
    parser.add_argument("--set", choices=("selection", "report", "all"), default="all")
    parser.add_argument("--methods", default=",".join([*SERVED, "lime-reference"]),
                        help=f"comma-separated, of: {', '.join(METHODS)}; 'candidates' for the candidates and the served ones")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000-fullres")
    parser.add_argument("--weights", type=Path, default=ROOT / "model_store" / "resnet34.pt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a serving worker runs one)")
    parser.add_argument("--save", type=Path, help="also write the per-photo results here (JSON)")
    args = parser.parse_args()
    methods = [*SERVED, *CANDIDATES] if args.methods == "candidates" else [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {', '.join(sorted(unknown))}")
    torch.set_num_threads(args.threads)
    predictor = Predictor.from_checkpoint(args.weights)
    torch.manual_seed(0)
    random_model = Predictor(build_model(predictor.arch), predictor.arch, predictor.image_size,
                             colour_constancy=predictor.colour_constancy)
    photos = choose_photos(predictor, args.data, args.per_class)
    parts = ("selection", "report") if args.set == "all" else (args.set,)
    photos = [photo for photo in photos if photo.part in parts]
    for name in methods:  # warm-up: imports, allocator, kernel choice
        METHODS[name](predictor, photos[0].image, photos[0].label)
    print(f"model {predictor.arch} ({args.weights.name}), {len(photos)} photos from {args.data}, torch threads "
          f"{torch.get_num_threads()}, load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    results = evaluate(predictor, random_model, photos, methods)
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.save:
        args.save.write_text(json.dumps({"photos": [[p.name, p.code, CLASS_CODES[p.label], p.probability, p.part]
                                                    for p in photos], "results": results}, default=float))
    for part in parts:
        indices = [i for i, photo in enumerate(photos) if photo.part == part]
        print(f"\n{part} set: {len(indices)} photos, {sum(photos[i].probability < UNSURE for i in indices)} with "
              f"probability under {UNSURE}")
        print_rows(faithfulness_table(results, methods, indices))
        if any("served" in results[name][0] for name in methods):
            print("\nserved (median seconds per explanation with its self-check, drawing and encoding; self-check means)")
            print_rows(served_table(results, methods, indices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
