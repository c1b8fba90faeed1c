"""Image decoding and the one preprocessing used by training, evaluation and serving."""

from __future__ import annotations

import io
import math
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# Decompression-bomb guard: a 15 MB upload can still claim billions of pixels in its header. A JPEG decodes
# at a reduced scale (DCT scaling, below), so its cost barely grows with its size; every other format inflates
# every pixel, 12-17 ns each here (a 50 MP PNG took 0.65-0.86 s against 0.05 s for a 600x450 photo), so it is
# held to what keeps a request within 3x a photo's time (bench/budget.py).
MAX_IMAGE_PIXELS = 50_000_000
MAX_FULL_DECODE_PIXELS = 8_000_000
MIN_IMAGE_SIDE = 16
# Work per request stays bounded whatever the upload's size: a larger photo is decoded at a reduced scale
# (JPEG's 1/2-1/8 DCT scaling) or reduced by a whole factor, to a longer side from this to twice this. The
# largest thing made from a photo is the 1024-px explanation PNG; the model reads 144 px.
DECODED_MIN_SIDE = 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """The bytes are not an image this service accepts; the message is meant for the user."""


def decode_image(data: bytes) -> Image.Image:
    """Decode JPEG/PNG/WebP/BMP/TIFF bytes into an upright RGB image, or raise ImageError."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} pixels are accepted"
                )
            if image.format != "JPEG" and width * height > MAX_FULL_DECODE_PIXELS:
                raise ImageError(
                    f"the {image.format} image is {width}x{height} pixels; at most {MAX_FULL_DECODE_PIXELS:,} pixels are "
                    f"accepted in {image.format} (JPEG up to {MAX_IMAGE_PIXELS:,}): downscale it or send a JPEG"
                )
            if min(width, height) < MIN_IMAGE_SIDE:
                raise ImageError(f"the image is {width}x{height} pixels; each side needs at least {MIN_IMAGE_SIDE}")
            # is_animated reads the first frame's header only; n_frames walks every page, quadratically in Pillow.
            if getattr(image, "is_animated", False):
                raise ImageError("animated or multi-page images are not accepted; send a single frame")
            if image.format == "JPEG" and max(width, height) >= 2 * DECODED_MIN_SIDE:
                scale = DECODED_MIN_SIDE / max(width, height)
                image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"the data is not a decodable image (accepted: {', '.join(ACCEPTED_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"the image has more than {MAX_IMAGE_PIXELS:,} pixels") from None
    # Pillow's parsers signal malformed files with all of these. Found by fuzzing, on a TIFF's later pages
    # (read when counting them): TypeError for a page without dimensions, KeyError for an unknown compression.
    except (OSError, ValueError, TypeError, KeyError, SyntaxError, EOFError, struct.error) as exc:
        raise ImageError(f"the image is corrupt or truncated ({exc})") from None


# 16-bit value -> the nearest 8-bit one, looked up (one pass, no float copy of the image).
SIXTEEN_TO_EIGHT_BITS = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16/32-bit scaled, transparency composited on white; a longer side over
    twice DECODED_MIN_SIDE reduced by a whole factor first, so no full-size copy is ever made in RGB."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray(SIXTEEN_TO_EIGHT_BITS[np.asarray(image).astype(np.uint16)], "L")
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        values *= 255.0 / top
        values += 0.5
        image = Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8), "L")
    if image.mode == "1":
        image = image.convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    factor = max(image.size) // DECODED_MIN_SIDE
    if factor >= 2:
        image = image.reduce(factor)
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def shades_of_gray(images: torch.Tensor, power: float) -> torch.Tensor:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004; p=6 in the ISIC 2019 winner's pipeline) for
    uint8 images (...x3xHxW): each channel scaled so that the illuminant, the power-`power` mean of its values,
    comes out grey. Dermatoscopes differ in their light; this removes most of that difference."""
    values = images.float()
    illuminant = values.pow(power).mean(dim=(-2, -1), keepdim=True).pow(1.0 / power).clamp_min(1.0)
    gain = illuminant.mean(dim=-3, keepdim=True) / illuminant
    return (values * gain).round_().clamp_(0, 255).to(torch.uint8)


def resize(image: Image.Image | torch.Tensor, image_size: tuple[int, int], colour_constancy: float = 0.0) -> torch.Tensor:
    """An RGB image (PIL or uint8 CxHxW tensor) resized to the model's input as a uint8 tensor, with Shades of
    Gray colour constancy of that power applied when it is not 0."""
    tensor = F.pil_to_tensor(image) if isinstance(image, Image.Image) else image
    small = F.resize(tensor, list(image_size), antialias=True)
    return shades_of_gray(small, colour_constancy) if colour_constancy else small


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (...x3xHxW) to the float input the network was trained on."""
    return F.normalize(images.float().div(255.0), IMAGENET_MEAN, IMAGENET_STD)


def preprocess(image: Image.Image, image_size: tuple[int, int], colour_constancy: float = 0.0) -> torch.Tensor:
    """The model input for one RGB image: the same function for training, evaluation and serving."""
    return normalize(resize(image, image_size, colour_constancy))


# Test-time augmentation: a dermoscopy photo has no up, down, left or right, so the model should give every
# flip and transpose of it the same answer; averaging over them cancels some of each view's error.
TTA_VIEWS = {"none": 1, "flips": 4, "dihedral": 8}


def dihedral_views(inputs: torch.Tensor, views: str) -> list[torch.Tensor]:
    """The first TTA_VIEWS[views] views of a batch (N x C x H x W) under the dihedral group: identity and the
    three flips, then the same four transposed (those are W x H: the network pools over any input size)."""
    if views not in TTA_VIEWS:
        raise ValueError(f"unknown views {views!r}; choose one of {sorted(TTA_VIEWS)}")
    flipped = [inputs, inputs.flip(-1), inputs.flip(-2), inputs.flip(-2, -1)]
    return (flipped + [view.transpose(-2, -1) for view in flipped])[: TTA_VIEWS[views]]


# Training augmentation (dermoscopy has no up or down): what train_transform draws from.
ROTATION_DEGREES = 30.0
CROP_SCALE = (0.4, 1.0)  # share of the photo a random crop keeps
CROP_ASPECT_JITTER = (0.8, 1.25)  # times the photos' own aspect
COLOUR_JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}


def train_transform(image_size: tuple[int, int], rotation: float = ROTATION_DEGREES) -> v2.Compose:
    """The training preset for decoded uint8 photos (CxHxW): rotation, a random crop resized to the model's
    input, flips and colour jitter. `normalize` then turns it into model input, as `preprocess` does."""
    height, width = image_size
    aspect = width / height
    return v2.Compose([
        v2.RandomRotation(rotation),
        v2.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=tuple(aspect * r for r in CROP_ASPECT_JITTER)),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.ColorJitter(**COLOUR_JITTER),
    ])
