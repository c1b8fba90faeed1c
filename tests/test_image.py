"""Decoding every accepted format and mode, rejecting bad bytes, and one shared preprocessing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from skinlesion.image import MAX_IMAGE_PIXELS, ImageError, decode_image, normalize, preprocess, resize
from skinlesion.model import DEFAULT_IMAGE_SIZE
from training.__main__ import load_images
from training.data import Sample


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :].repeat(size[1], 0)
    rgb = np.stack([x, x[:, ::-1], np.full_like(x, 100)], axis=2)
    return Image.fromarray(rgb, "RGB").convert(mode)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_every_accepted_format_decodes_to_rgb(fmt: str) -> None:
    image = decode_image(encode(gradient(), fmt))
    assert image.mode == "RGB" and image.size == (64, 48)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I" else "PNG"
    image = decode_image(encode(gradient(mode), fmt))
    assert image.mode == "RGB" and image.size == (64, 48)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    values = np.full((32, 32), 32768, dtype=np.uint16)  # half of the 16-bit range
    image = decode_image(encode(Image.fromarray(values), "PNG"))
    assert abs(int(np.asarray(image)[0, 0, 0]) - 128) <= 1


def test_transparency_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(clear, "PNG"))).min() == 255


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is portrait
    image = decode_image(encode(gradient(size=(64, 48)), "JPEG", exif=exif.tobytes()))
    assert image.size == (48, 64)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, world", "not a decodable image"),
        (encode(gradient(), "GIF"), "not a decodable image"),
        (encode(gradient(), "JPEG")[:200], "corrupt or truncated"),
        (encode(gradient(), "PNG")[:-30], "corrupt or truncated"),
        (encode(gradient(size=(1, 1)), "PNG"), "at least"),
    ],
    ids=["empty", "text", "gif", "truncated-jpeg", "truncated-png", "one-pixel"],
)
def test_bad_bytes_raise_image_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    bomb = encode(Image.new("1", (side, side)), "PNG")  # a few kB that would decode to 50+ MP
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="pixels"):
        decode_image(bomb)


def test_multi_frame_tiff_is_refused() -> None:
    frames = [gradient(), gradient()]
    data = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="single frame"):
        decode_image(data)


def test_training_and_serving_give_the_same_tensor(fullres_images, tmp_path) -> None:
    path = fullres_images[0]
    served = preprocess(decode_image(path.read_bytes()), DEFAULT_IMAGE_SIZE)
    # Training's validation/test path caches the resized uint8 image and normalizes per batch.
    (cached,) = load_images([Sample(path.stem, "lesion", 0, path)], DEFAULT_IMAGE_SIZE, "test")
    assert served.shape == (3, *DEFAULT_IMAGE_SIZE)
    assert torch.equal(normalize(cached), served)
    assert torch.equal(cached, resize(decode_image(path.read_bytes()), DEFAULT_IMAGE_SIZE))
