"""Image decoding and the one preprocessing used by training, evaluation and serving."""

from __future__ import annotations

import io
import math
import re
import struct
import time
import warnings

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from skinlesion.options import ACCEPTED_FORMATS

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
# Decoding work that the pixel limits do not bound, refused by structure before decoding. Each scan of a
# progressive JPEG passes over every coefficient again, 1.2-10 ms a scan at 16 MP here, and a 15 MB body holds
# 450,000 one-block scans: minutes. Encoders write about 10 (libjpeg's default script) and no camera over 20;
# libtiff refuses JPEG-in-TIFF strips of over 100 scans for the same reason.
MAX_JPEG_SCANS = 100
# Fewer scans still cost whatever their size: a scan passes over every block of the components it codes, so a
# progressive JPEG's decoding work is the pixels its scans cover, summed (a 4:2:0 colour scan that codes all three
# components covers 1.5x the image's pixels). Measured here 0.45-0.5 ms per million for libjpeg's own scripts and
# up to 0.6 ms for a scan that costs the most without more bytes (a repeated AC refinement), this keeps any
# progressive JPEG within 90 ms of decoding, what a request can add and stay within 3x a 600x450 photo's time
# (bench/budget.py). libjpeg's 10 scans cover 8x the pixels of a 4:2:0 photo, 14x of a 4:4:4 one: progressive
# photos pass up to 18.75 MP (4:2:0) and 10.7 MP (4:4:4), a phone's 12 MP in 4:2:0 with room; baseline JPEGs,
# whose components are each coded once and decoded at a reduced scale, up to MAX_IMAGE_PIXELS.
MAX_JPEG_SCAN_PIXELS = 150_000_000
# Pillow walks a JPEG's header segments (and the padding bytes between them) and a PNG's chunks in Python,
# 0.3-3 us each: 15 MB of empty ones took 3-6 s. A photo has tens of segments; a 15 MB PNG written in
# libpng's 8 kB IDAT chunks about 2,000 chunks.
MAX_SEGMENTS = 10_000
# The backstop for the work nothing above foresees: decoding stops at its next read of the upload once it has
# used this much CPU time (the worst accepted files take 0.1-0.2 s here: a progressive JPEG at the scan work limit,
# a 50 MP baseline photo of 15 MB). No bound on scans: 100 scans of 30 bytes fit in one read.
# Pillow hands a decoder 64 kB at a time, which can be 1.4 s of scans at 16 MP; blocks of 16 kB stop it within
# a quarter of that and cost 2% more time on a 13 MB JPEG.
MAX_DECODE_CPU_SECONDS = 1.0
DECODE_BLOCK_BYTES = 16_384
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """The bytes are not an image this service accepts; the message is meant for the user."""


class CpuBudgetedUpload(io.BytesIO):
    """The upload as the file Pillow decodes from, refusing every read after `seconds` of this thread's CPU
    time. Pillow parses headers and feeds its decoders a block at a time, so a decode that runs long stops
    within a block's work; WebP, and a TIFF that libtiff decodes, are read whole in one call."""

    def __init__(self, data: bytes, seconds: float) -> None:
        super().__init__(data)
        self.deadline = time.thread_time() + seconds

    def read(self, size: int | None = -1, /) -> bytes:
        if time.thread_time() > self.deadline:
            raise ImageError(f"decoding the image took over {MAX_DECODE_CPU_SECONDS:g} s of CPU time; send a plain photo")
        return super().read(size)


def decode_image(data: bytes) -> Image.Image:
    """Decode JPEG/PNG/WebP/BMP/TIFF bytes into an upright RGB image, or raise ImageError."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    check_structure(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(CpuBudgetedUpload(data, MAX_DECODE_CPU_SECONDS), formats=ACCEPTED_FORMATS)
            width, height = image.size
            # An MPO is a JPEG followed by more images (a phone's depth map, HDR gain map or second view):
            # its first image is the photo, and the only one decoded.
            jpeg = image.format in ("JPEG", "MPO")
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} pixels are accepted"
                )
            if not jpeg and width * height > MAX_FULL_DECODE_PIXELS:
                raise ImageError(
                    f"the {image.format} image is {width}x{height} pixels; at most {MAX_FULL_DECODE_PIXELS:,} pixels are "
                    f"accepted in {image.format} (JPEG up to {MAX_IMAGE_PIXELS:,}): downscale it or send a JPEG"
                )
            if min(width, height) < MIN_IMAGE_SIDE:
                raise ImageError(f"the image is {width}x{height} pixels; each side needs at least {MIN_IMAGE_SIDE}")
            # is_animated reads the first frame's header only; n_frames walks every page, quadratically in Pillow.
            if image.format != "MPO" and getattr(image, "is_animated", False):
                raise ImageError("animated or multi-page images are not accepted; send a single frame")
            # Pillow decodes RLE-compressed BMP (BI_RLE8 and BI_RLE4: a palette format no camera writes) in
            # Python, pixel by pixel: 15 MB of one-pixel runs take 2.4 s, 70 kB of RLE4 runs 0.5 s.
            if image.format == "BMP" and image.info.get("compression") in (1, 2):
                raise ImageError("RLE-compressed BMP is not accepted; send an uncompressed BMP, a PNG or a JPEG")
            if jpeg and max(width, height) >= 2 * DECODED_MIN_SIDE:
                scale = DECODED_MIN_SIDE / max(width, height)
                image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            image.decodermaxblock = DECODE_BLOCK_BYTES
            image.load()
            return to_rgb(upright(image))
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


def check_structure(data: bytes) -> None:
    """Refuse a JPEG or PNG whose segments alone would cost more decoding than any photo (MAX_JPEG_SCANS,
    MAX_JPEG_SCAN_PIXELS, MAX_SEGMENTS); what is malformed is left for Pillow to report."""
    if data.startswith(b"\xff\xd8"):
        check_jpeg_structure(data)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        check_png_structure(data)


# Entropy-coded data ends at the first 0xFF followed by a marker: not 0x00 (a stuffed 0xFF byte), not a
# restart marker (0xD0-0xD7), not another 0xFF (fill).
END_OF_ENTROPY_CODED_DATA = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def check_jpeg_structure(data: bytes) -> None:
    """Walk a JPEG's markers from SOI to its first EOI (an MPO's later images are never decoded), counting
    segments, the padding bytes between them, scans (SOS, skipping each one's entropy-coded data) and the pixels
    a progressive frame's scans cover."""
    segments = scans = scan_pixels = 0
    components: dict[int, int] = {}  # the progressive frame's component ids and their pixels
    at = 2
    while at + 4 <= len(data):
        marker = data[at + 1]
        # Padding (0xFF fill) and bytes that are not a marker: Pillow steps over them one by one too, where a
        # length is never read. RSTn and SOI stand alone.
        if data[at] != 0xFF or marker == 0xFF or marker < 0xC0:
            at += 1
        elif marker == 0xD9:  # EOI
            return
        elif 0xD0 <= marker <= 0xD8:
            at += 2
        else:
            length = int.from_bytes(data[at + 2:at + 4], "big")
            segment = data[at + 4:at + 2 + length]
            if marker in FRAME_MARKERS:
                components = frame_components(segment) if marker in PROGRESSIVE_FRAME_MARKERS else {}
            at += 2 + length
            if marker == 0xDA:
                scans += 1
                if scans > MAX_JPEG_SCANS:
                    raise ImageError(f"the JPEG has more than {MAX_JPEG_SCANS} scans; no camera writes that many, so "
                                     "it is refused rather than decoded (re-save it as a baseline JPEG)")
                count = segment[0] if segment else 0
                scan_pixels += sum(components.get(c, 0) for c in segment[1:1 + 2 * count:2])
                if scan_pixels > MAX_JPEG_SCAN_PIXELS:
                    raise ImageError(
                        f"the progressive JPEG's scans cover more than {MAX_JPEG_SCAN_PIXELS:,} pixels in all (each "
                        "scan counts the pixels of the colour components it codes), more decoding work than this "
                        "service accepts: re-save it as a baseline JPEG, or downscale it")
                end = END_OF_ENTROPY_CODED_DATA.search(data, at)
                if end is None:
                    return
                at = end.start()
        segments += 1
        if segments > MAX_SEGMENTS:
            raise ImageError(f"the JPEG has more than {MAX_SEGMENTS:,} segments or padding bytes between them; "
                             "re-save it without the extra metadata")


# Start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC), and those of progressive frames.
FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
PROGRESSIVE_FRAME_MARKERS = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def frame_components(header: bytes) -> dict[int, int]:
    """A frame header's component ids, each with its pixels (the image's, scaled by its sampling factors
    against the largest ones); empty where the header is malformed, which Pillow then reports."""
    if len(header) < 6:
        return {}
    height, width = int.from_bytes(header[1:3], "big"), int.from_bytes(header[3:5], "big")
    entries = [header[at:at + 3] for at in range(6, 6 + 3 * header[5], 3) if len(header[at:at + 3]) == 3]
    most_across = max((entry[1] >> 4 for entry in entries), default=0)
    most_down = max((entry[1] & 0x0F for entry in entries), default=0)
    if not most_across or not most_down:
        return {}
    return {entry[0]: math.ceil(width * (entry[1] >> 4) / most_across) * math.ceil(height * (entry[1] & 0x0F) / most_down)
            for entry in entries}


def check_png_structure(data: bytes) -> None:
    """Count a PNG's chunks up to IEND."""
    at = 8
    for _ in range(MAX_SEGMENTS):
        if at + 8 > len(data) or data[at + 4:at + 8] == b"IEND":
            return
        at += 12 + int.from_bytes(data[at:at + 4], "big")
    raise ImageError(f"the PNG has more than {MAX_SEGMENTS:,} chunks; re-save it without the extra metadata")


# EXIF orientation -> the transpose that makes the image upright. ImageOps.exif_transpose does the same and
# then writes the EXIF again without the tag: 7 s and 1.4 GB for a PNG carrying 14 MB of EXIF.
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF (or XMP) orientation says."""
    method = UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation))
    return image if method is None else image.transpose(method)


# 16-bit value -> the nearest 8-bit one, looked up (one pass, no float copy of the image).
SIXTEEN_TO_EIGHT_BITS = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16/32-bit integers scaled from their range (0-255 or 0-65535, whichever
    holds the values), 32-bit floats likewise or from 0-1 when no value is over 1; transparency (alpha, or a
    PNG's key colour) composited on white; LAB and CMYK converted as Pillow does (LAB through LittleCMS, CMYK
    without a profile). A longer side over twice DECODED_MIN_SIDE is reduced by a whole factor first, so no
    full-size copy is ever made in RGB."""
    # A key colour (a grey or RGB PNG's tRNS chunk) turns into alpha only in Pillow's conversion to LA/RGBA;
    # the rescaling below makes new images that no longer carry it.
    key_alpha = image.mode in ("1", "L", "I", "I;16", "RGB") and image.info.get("transparency") is not None
    alpha = image.convert("LA").getchannel("A") if key_alpha else None
    if image.mode.startswith("I;16"):
        image = Image.fromarray(SIXTEEN_TO_EIGHT_BITS[np.asarray(image).astype(np.uint16)], "L")
    if image.mode in ("I", "F"):
        # np.array copies: np.asarray of a float image is a read-only view of Pillow's buffer.
        values = np.nan_to_num(np.array(image, dtype=np.float32), posinf=0.0, neginf=0.0)
        largest = values.max(initial=0)
        top = 1.0 if image.mode == "F" and largest <= 1 else 65535.0 if largest > 255 else 255.0
        values *= 255.0 / top
        values += 0.5
        image = Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8), "L")
    if image.mode == "1":
        image = image.convert("L")
    if alpha is not None:
        image.putalpha(alpha)
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


def quarter_turns(height: int, width: int, image_size: tuple[int, int]) -> int:
    """1 for a photo whose orientation (portrait or landscape) is not the model input's, else 0. Such a photo is
    turned a quarter before it is resized, rather than squeezed: a dermoscopy photo has no up or down, and a quarter
    turn of a landscape photo then gives the same four flips, and so the same answer, as the photo itself."""
    return int(height != width and (height > width) != (image_size[0] > image_size[1]))


def resize(image: Image.Image | torch.Tensor, image_size: tuple[int, int], colour_constancy: float = 0.0) -> torch.Tensor:
    """An RGB image (PIL or uint8 CxHxW tensor) turned to the model input's orientation (quarter_turns) and resized
    to it as a uint8 tensor, with Shades of Gray colour constancy of that power applied when it is not 0."""
    tensor = F.pil_to_tensor(image) if isinstance(image, Image.Image) else image
    if quarter_turns(*tensor.shape[-2:], image_size):
        tensor = tensor.rot90(1, (-2, -1))
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
