"""Decoding every accepted format and mode, rejecting bad bytes, and one shared preprocessing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from skinlesion.image import (
    MAX_IMAGE_PIXELS,
    TTA_VIEWS,
    ImageError,
    decode_image,
    dihedral_views,
    normalize,
    preprocess,
    resize,
    shades_of_gray,
)
from skinlesion.model import DEFAULT_IMAGE_SIZE
from skinlesion.options import ACCEPTED_FORMATS, IMAGE_SUFFIXES
from training.data import Sample
from training.train import load_images


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


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_the_image_as_pillow_does(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(gradient(size=(64, 48)), "PNG", exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(expected))


@pytest.mark.parametrize(("values", "grey"), [(0.5, 128), (1.0, 255), (128.0, 128), (32768.0, 128), (-3.0, 0)],
                         ids=["unit-half", "unit-one", "byte-half", "sixteen-bit-half", "negative"])
def test_a_32_bit_float_tiff_is_scaled_from_its_range(values: float, grey: int) -> None:
    # Refused as "corrupt" before: the scaling wrote into numpy's read-only view of the image.
    image = decode_image(encode(Image.new("F", (32, 32), values), "TIFF"))
    assert np.asarray(image).tolist() == [[[grey] * 3] * 32] * 32


def test_a_float_tiff_with_nan_and_infinity_decodes() -> None:
    values = np.full((32, 32), 0.5, dtype=np.float32)
    values[0, :3] = [np.nan, np.inf, -np.inf]
    pixels = np.asarray(decode_image(encode(Image.fromarray(values, "F"), "TIFF")))
    assert pixels[0, :3, 0].tolist() == [0, 0, 0] and pixels[5, 5, 0] == 128


def test_an_mpo_decodes_its_first_image() -> None:
    # A phone's photo with its depth map or HDR gain map after it: refused as animated before.
    first, second = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (32, 24), (30, 200, 30))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    image = decode_image(data)
    assert image.size == (64, 48)
    assert np.abs(np.asarray(image, dtype=int) - (200, 30, 30)).max() <= 3


@pytest.mark.parametrize(("mode", "key"), [("1", 0), ("L", 0), ("RGB", (0, 0, 0)), ("I;16", 0), ("P", 0)])
def test_a_key_colour_is_transparent_on_white(mode: str, key) -> None:
    # A PNG's tRNS chunk: the pixels of that one colour are transparent. They came out black before, except in P.
    image = Image.new(mode, (32, 32), 0)
    image.paste(Image.new(mode, (16, 32), 1 if mode in ("1", "P") else 200 if mode != "RGB" else (200, 200, 200)), (16, 0))
    if mode == "P":
        image.putpalette([0, 0, 0, 90, 90, 90])
    pixels = np.asarray(decode_image(encode(image, "PNG", transparency=key)))
    opaque = np.asarray(decode_image(encode(image, "PNG")))
    assert opaque[:, :16].max() == 0 and pixels[:, :16].min() == 255
    assert np.array_equal(pixels[:, 16:], opaque[:, 16:])


def test_a_lab_tiff_is_converted_to_srgb() -> None:
    # CIELab L* 50, a* = b* = 0 (Pillow writes a* and b* signed, as TIFF 6.0 says): a mid grey, sRGB 119.
    image = decode_image(encode(Image.new("LAB", (32, 32), (128, 128, 128)), "TIFF"))
    assert np.abs(np.asarray(image, dtype=int) - 119).max() <= 1


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
@pytest.mark.parametrize(("cmyk", "rgb"), [((0, 0, 0, 0), (255, 255, 255)), ((0, 0, 0, 255), (0, 0, 0)),
                                           ((255, 0, 0, 0), (0, 255, 255)), ((0, 0, 0, 128), (127, 127, 127))],
                         ids=["white", "black", "cyan", "grey"])
def test_cmyk_is_converted_without_a_profile(fmt: str, cmyk: tuple, rgb: tuple) -> None:
    # Pillow writes a CMYK JPEG inverted with an Adobe marker, as Photoshop does, and reads it back so.
    image = decode_image(encode(Image.new("CMYK", (32, 32), cmyk), fmt, quality=100))
    assert np.abs(np.asarray(image, dtype=int) - rgb).max() <= 2


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


def test_training_and_serving_share_the_colour_constancy(fullres_images) -> None:
    image = decode_image(fullres_images[0].read_bytes())
    (cached,) = load_images([Sample("a", "lesion", 0, fullres_images[0])], DEFAULT_IMAGE_SIZE, "test", 6.0)
    assert torch.equal(normalize(cached), preprocess(image, DEFAULT_IMAGE_SIZE, 6.0))
    assert not torch.equal(cached, resize(image, DEFAULT_IMAGE_SIZE))


def test_shades_of_gray_removes_a_colour_cast() -> None:
    rng = np.random.default_rng(0)
    scene = rng.integers(40, 200, (1, 30, 40)).repeat(3, 0)  # grey content
    cast = torch.from_numpy(scene * np.array([1.2, 0.9, 0.6])[:, None, None]).round().to(torch.uint8)
    balanced = shades_of_gray(cast, 6.0)
    assert balanced.dtype == torch.uint8 and balanced.shape == cast.shape
    norms = balanced.float().pow(6).mean(dim=(-2, -1)).pow(1 / 6)
    assert float(norms.max() - norms.min()) < 1.0 < float(cast.float().pow(6).mean(dim=(-2, -1)).pow(1 / 6).std())
    # Already grey stays as it is; a batch is balanced image by image.
    grey = torch.from_numpy(scene).to(torch.uint8)
    assert torch.equal(shades_of_gray(grey, 6.0), grey)
    assert torch.equal(shades_of_gray(torch.stack([cast, grey]), 6.0)[0], balanced)


def test_dihedral_views_are_every_flip_and_transpose() -> None:
    batch = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    views = dihedral_views(batch, "dihedral")
    assert [tuple(v.shape) for v in views] == [(2, 3, 4, 6)] * 4 + [(2, 3, 6, 4)] * 4
    assert len({(v.shape, tuple(v.flatten().tolist())) for v in views}) == 8
    assert torch.equal(views[0], batch)
    assert [len(dihedral_views(batch, name)) for name in TTA_VIEWS] == list(TTA_VIEWS.values())
    with pytest.raises(ValueError, match="unknown views"):
        dihedral_views(batch, "rotations")


def test_the_image_suffixes_are_exactly_pillows_for_the_accepted_formats() -> None:
    # One list for the client and the data loader, and every accepted format has a suffix in it.
    registered = Image.registered_extensions()
    assert {registered[suffix] for suffix in IMAGE_SUFFIXES} == set(ACCEPTED_FORMATS)
