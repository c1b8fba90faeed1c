"""An out-of-domain image set for the model's "is this a dermatoscopic lesion?" check, built offline.

Three kinds of images the service should refuse to trust:
- photos: scikit-image's bundled sample photos (a rocket, a cat, coffee, a retina, histology, text, ...),
  whole and as random crops;
- generated: uniform and Gaussian noise, solid colours, gradients, checkerboards, text on a plain ground;
- damaged lesions: real lesion photos mostly cropped away (a corner, a sixteenth of the picture) or blurred
  beyond use (Gaussian blur of 4% of the width).
Each seed draws different crops, colours and lesions, so the set the method is chosen on and the set it is
reported on differ.
"""

from __future__ import annotations

import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageFilter

from skinlesion.image import to_rgb

# scikit-image's sample images that ship inside its wheel (the others need a download).
SAMPLE_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
    "rocket", "text",
)
CROPS_PER_PHOTO = 3
GENERATED_PER_KIND = 20
# The draws the out-of-domain score is chosen on (training.calibrate, with damaged validation lesions) and reported
# on (with damaged test lesions).
SELECTION_SEED, REPORT_SEED = 0, 1
# The HAM10000 photos' size and 4:3 aspect.
SIZE = (200, 150)
CROPPED_FRACTION = 0.25
BLUR_FRACTION = 0.04


def sample_photos(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    images = []
    for name in SAMPLE_PHOTOS:
        photo = to_rgb(Image.fromarray(getattr(skimage.data, name)()))
        images.append(("photo", photo))
        width, height = photo.size
        for _ in range(CROPS_PER_PHOTO):
            w = int(width * rng.uniform(0.4, 0.8))
            h = min(height, int(w * 0.75))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            images.append(("photo", photo.crop((x, y, x + w, y + h))))
    return images


def colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def generated_images(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    width, height = SIZE
    images = []
    for _ in range(GENERATED_PER_KIND):
        images.append(("noise", Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))))
        gaussian = rng.normal(rng.uniform(60, 200, 3), rng.uniform(5, 60), (height, width, 3))
        images.append(("noise", Image.fromarray(np.clip(gaussian, 0, 255).astype(np.uint8))))
        images.append(("solid colour", Image.new("RGB", SIZE, colour(rng))))
        ramp = np.linspace(0.0, 1.0, width)[None, :, None]
        start, end = np.array(colour(rng)), np.array(colour(rng))
        images.append(("gradient", Image.fromarray((start * (1 - ramp) + end * ramp).repeat(height, 0).astype(np.uint8))))
        square = int(rng.integers(5, 40))
        rows, columns = np.mgrid[:height, :width]
        dark = ((rows // square + columns // square) % 2).astype(bool)[..., None]
        images.append(("checkerboard", Image.fromarray(np.where(dark, colour(rng), colour(rng)).astype(np.uint8))))
        page = Image.new("RGB", SIZE, colour(rng, 150))
        draw = ImageDraw.Draw(page)
        for line in range(6):
            draw.text((5, 5 + 22 * line), f"lorem ipsum {int(rng.integers(1000))} dolor", fill=colour(rng, 0, 100))
        images.append(("text", page))
    return images


def damaged_lesions(lesions: list[Image.Image], rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    """Half of `lesions` mostly cropped away (a random corner), the other half heavily blurred."""
    images = []
    half = len(lesions) // 2
    for i, lesion in enumerate(lesions):
        width, height = lesion.size
        if i < half:
            w, h = int(width * CROPPED_FRACTION), int(height * CROPPED_FRACTION)
            corner = int(rng.integers(4))
            x, y = (0 if corner % 2 == 0 else width - w), (0 if corner < 2 else height - h)
            images.append(("cropped lesion", lesion.crop((x, y, x + w, y + h))))
        else:
            images.append(("blurred lesion", lesion.filter(ImageFilter.GaussianBlur(BLUR_FRACTION * width))))
    return images


def out_of_domain_set(lesions: list[Image.Image], seed: int) -> list[tuple[str, Image.Image]]:
    """(kind, RGB image) pairs: sample photos, generated images, and `lesions` damaged."""
    rng = np.random.default_rng(seed)
    return sample_photos(rng) + generated_images(rng) + damaged_lesions(lesions, rng)
