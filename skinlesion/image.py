"""Image decoding and the one preprocessing used by training, evaluation and serving."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# Decompression-bomb guard: a 15 MB upload can still claim billions of pixels in its header.
MAX_IMAGE_PIXELS = 50_000_000
MIN_IMAGE_SIDE = 16
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
            if min(width, height) < MIN_IMAGE_SIDE:
                raise ImageError(f"the image is {width}x{height} pixels; each side needs at least {MIN_IMAGE_SIDE}")
            if getattr(image, "n_frames", 1) > 1:
                raise ImageError("animated or multi-page images are not accepted; send a single frame")
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


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16/32-bit scaled, transparency composited on white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def resize(image: Image.Image | torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """An RGB image (PIL or uint8 CxHxW tensor) resized to the model's input as a uint8 tensor."""
    tensor = F.pil_to_tensor(image) if isinstance(image, Image.Image) else image
    return F.resize(tensor, list(image_size), antialias=True)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (...x3xHxW) to the float input the network was trained on."""
    return F.normalize(images.float().div(255.0), IMAGENET_MEAN, IMAGENET_STD)


def preprocess(image: Image.Image, image_size: tuple[int, int]) -> torch.Tensor:
    """The model input for one RGB image: the same function for training, evaluation and serving."""
    return normalize(resize(image, image_size))
