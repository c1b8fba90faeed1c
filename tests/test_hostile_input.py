"""Hostile input through the request path in-process (respond with a real Predictor): arbitrary bodies,
wrong types, unicode, deep nesting, corrupted and forged images, decompression bombs, animations.

The property: every body ends as an envelope, 200 for a real image and 400 (or 413) otherwise; nothing
raises out of respond(), nothing answers 5xx, and bombs are refused without their memory being spent.
Hypothesis uses the "ci" profile (derandomized, no deadline, few examples) unless HYPOTHESIS_PROFILE=dev
asks for a longer random search. Decoder cases that test_image.py already pins are not repeated here.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin, TiffImagePlugin

import skinlesion.image
from bench.budget import many_page_tiff, progressive_scan_bomb
from serving.service import respond
from skinlesion.image import (
    DECODED_MIN_SIDE,
    MAX_DECODE_CPU_SECONDS,
    MAX_FULL_DECODE_PIXELS,
    MAX_IMAGE_PIXELS,
    MAX_JPEG_SCAN_PIXELS,
    MAX_JPEG_SCANS,
    MAX_SEGMENTS,
    MIN_IMAGE_SIDE,
    ImageError,
    decode_image,
)
from skinlesion.model import CLASS_NAMES
from tests.conftest import ROOT

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo(size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A small RGB image with structure, so that every encoder produces real entropy-coded data."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


SEEDS = {fmt: encode(photo(), fmt) for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF")}
JPEG_B64 = base64.b64encode(SEEDS["JPEG"]).decode()


def answer(predictor, body) -> tuple[int, dict]:
    [(status, payload)] = respond(predictor, [body])
    json.dumps(payload)  # TorchServe serializes the payload with json.dumps
    return status, payload


def assert_refused(status: int, payload: dict) -> None:
    assert status in (400, 413)
    assert payload == {"success": False, "error": payload["error"]}
    assert isinstance(payload["error"], str) and payload["error"]


def assert_enveloped(status: int, payload: dict) -> None:
    """Either a real prediction or a client-error envelope: never a 5xx."""
    if status == 200:
        assert payload["success"] is True and payload["prediction"] in CLASS_NAMES
    else:
        assert_refused(status, payload)


json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                | st.text(max_size=20) | st.sampled_from(["", "A" * 4, "data:image/png;base64,", "\u0000", "\ud7ff\ufffd"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                                       max_size=4), max_leaves=12)
# Strings that look like valid choices to a person but must not be to the parser.
near_misses = st.sampled_from(["low ", " Low", "LOW\x00", "L\u043ew", "\uff2c\uff4f\uff57", "gradcam\n", "GRAD-CAM", "lime;",
                               "medium\u200b", "H\u0131gh", "HIGH\u0307", "", "null", "true", "Melanoma ", "Mel\u0430noma",
                               "mel"])


@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_a_400_envelope(predictor, body: bytes) -> None:
    assert_refused(*answer(predictor, body))


@given(json_values, st.booleans())
def test_any_json_document_without_an_image_string_is_a_400_envelope(predictor, document, ascii_only: bool) -> None:
    if isinstance(document, dict) and isinstance(document.get("image"), str):
        document = {**document, "image": None}
    status, payload = answer(predictor, json.dumps(document, ensure_ascii=ascii_only).encode())
    assert_refused(status, payload)


# Case variants of the real choices, which the contract accepts.
case_variants = st.sampled_from(["hIgH", "low", "MEDIUM", "GradCAM", "LIME", "Lime", "Gradient", "melanoma",
                                 "MELANOCYTIC NEVI"])


@given(st.sampled_from(["explain", "precision", "method", "explain_class"]), json_values | near_misses | case_variants)
def test_a_wrong_value_in_any_option_is_a_400_naming_the_field(predictor, field: str, value) -> None:
    # Written out here rather than derived from parse_request's own normalisation, so a bug there shows.
    valid = {"explain": isinstance(value, bool),
             "precision": isinstance(value, str) and value.isascii() and value.lower() in {"low", "medium", "high"},
             "method": isinstance(value, str) and value.isascii() and value.lower() in {"lime", "gradcam", "gradient"},
             "explain_class": isinstance(value, str) and value.lower() in {
                 "actinic keratoses", "basal cell carcinoma", "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                 "melanocytic nevi", "vascular lesions"}}[field]
    status, payload = answer(predictor, json.dumps({"image": JPEG_B64, field: value}).encode())
    if valid:  # a case-variant of a real choice, e.g. "hIgH": the prediction is made
        assert status == 200
    else:
        assert_refused(status, payload)
        assert f"'{field}'" in payload["error"]


@given(st.text(max_size=200))
def test_unicode_in_the_image_field_is_a_400_envelope(predictor, text: str) -> None:
    assert_refused(*answer(predictor, json.dumps({"image": "\u00e9" + text}, ensure_ascii=False).encode()))


@given(st.binary(max_size=2048))
def test_base64_of_arbitrary_bytes_is_a_400_envelope(predictor, data: bytes) -> None:
    status, payload = answer(predictor, {"image": base64.b64encode(data).decode()})
    assert_refused(status, payload)


@st.composite
def corrupted_images(draw) -> bytes:
    """A small real image with a few truncations, bit flips, insertions and deletions."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        operation = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        if operation == "truncate":
            del data[at:]
        elif operation == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


@given(corrupted_images())
def test_corrupted_images_decode_or_are_refused(predictor, data: bytes) -> None:
    try:
        image = decode_image(data)
    except ImageError:
        pass
    else:
        assert image.mode == "RGB" and min(image.size) >= MIN_IMAGE_SIDE
        assert image.width * image.height <= MAX_IMAGE_PIXELS
    assert_enveloped(*answer(predictor, {"image": base64.b64encode(data).decode()}))


@given(st.sampled_from(sorted(SEEDS)), st.integers(1, 40), st.integers(1, 40))
def test_only_images_at_least_16_pixels_a_side_are_classified(predictor, fmt: str, width: int, height: int) -> None:
    data = encode(photo((width, height)), fmt)
    status, payload = answer(predictor, {"image": base64.b64encode(data).decode()})
    if min(width, height) >= MIN_IMAGE_SIDE:
        assert status == 200 and payload["success"] is True
    else:
        assert_refused(status, payload)
        assert f"{width}x{height}" in payload["error"]


def png_claiming(width: int, height: int) -> bytes:
    """A valid 16x16 PNG whose IHDR (with a correct CRC) claims width x height."""
    data = bytearray(encode(photo((16, 16)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid JPEG whose start-of-frame segment claims width x height."""
    data = bytearray(SEEDS["JPEG"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(SEEDS["BMP"])
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


FORGERS = {"PNG": png_claiming, "JPEG": jpeg_claiming, "BMP": bmp_claiming}
# Headers that claim over the limit: PNG and BMP sides go to 2**31 - 1, JPEG's to 65,535.
huge_sides = st.integers(7_072, 2**31 - 1)


@given(st.sampled_from(sorted(FORGERS)), huge_sides, huge_sides)
def test_forged_huge_dimensions_are_refused_by_the_pixel_limit(fmt: str, width: int, height: int) -> None:
    if fmt == "JPEG":
        width, height = min(width, 65_535), min(height, 65_535)
    with pytest.raises(ImageError, match="pixels"):
        decode_image(FORGERS[fmt](width, height))


def png_with_text_bomb() -> bytes:
    """A small PNG carrying a zTXt chunk that inflates to 50 MB."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * 50_000_000, zip=True)
    return encode(photo(), "PNG", pnginfo=info)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def grey_png(extra: bytes = b"", idat_size: int = 1 << 20) -> bytes:
    """A 24x16 grey PNG built chunk by chunk: `extra` after IHDR, then its image data in IDAT chunks of
    `idat_size` bytes."""
    rows = zlib.compress((b"\x00" + bytes(range(0, 240, 10))) * 16)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 24, 16, 8, 0, 0, 0, 0)) + extra
            + b"".join(png_chunk(b"IDAT", rows[at:at + idat_size]) for at in range(0, len(rows), idat_size))
            + png_chunk(b"IEND", b""))


def bmp_rle8(width: int, height: int, body: bytes) -> bytes:
    """An 8-bit palette BMP whose pixels are the RLE8 `body`."""
    palette = bytes(4 * 256)
    offset = 14 + 40 + len(palette)
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + header + palette + body


def bombs() -> dict[str, tuple[bytes, str]]:
    """name: (a body of at most 15 MB, what its refusal says); each would take gigabytes, 50 MB of text, or
    seconds to minutes of CPU time if decoded."""
    jpeg, body = SEEDS["JPEG"], 15_000_000
    return {
        "png-header-65535^2": (png_claiming(65_535, 65_535), "pixels"),
        "png-header-2^31-wide": (png_claiming(2**31 - 1, 16), "pixels"),
        "jpeg-header-65535^2": (jpeg_claiming(65_535, 65_535), "pixels"),
        "bmp-header-2^31-wide": (bmp_claiming(2**31 - 1, 16), "pixels"),
        "tiff-group4-8000^2": (encode(Image.new("1", (8000, 8000)), "TIFF", compression="group4"), "pixels"),
        "png-1bit-8000^2": (encode(Image.new("1", (8000, 8000)), "PNG"), "pixels"),
        "png-ztxt-50MB": (png_with_text_bomb(), "too large"),
        # Pillow's own limit on decompressed text (MAX_TEXT_CHUNK) holds for an ICC profile too.
        "png-iccp-50MB": (encode(photo(), "PNG", icc_profile=bytes(50_000_000)), "too large"),
        # Decoding work rather than memory: 24 s, 1 s, 4 s, 6 s, 3 s and 2.4 s of CPU before these were refused.
        "jpeg-20000-scans": (progressive_scan_bomb(1024, 20_000), f"more than {MAX_JPEG_SCANS} scans"),
        "jpeg-16MP-100-refinement-scans": (progressive_scan_bomb(4096, MAX_JPEG_SCANS, refinement=True),
                                           f"cover more than {MAX_JPEG_SCAN_PIXELS:,} pixels"),
        "jpeg-3.7M-empty-comments": (jpeg[:2] + b"\xff\xfe\x00\x02" * (body // 4) + jpeg[2:], "segments"),
        "jpeg-15MB-fill-bytes": (jpeg[:2] + b"\xff" * body + jpeg[2:], "padding bytes"),
        "png-1.25M-empty-chunks": (grey_png(png_chunk(b"abCd", b"") * (body // 12)), "chunks"),
        "bmp-rle8-7.5M-one-pixel-runs": (bmp_rle8(2700, 2700, b"\x01\x07" * (body // 2)), "RLE"),
    }


def test_decompression_bombs_are_refused_in_bounded_memory_and_time(tmp_path: Path) -> None:
    # A fresh interpreter, so that its peak RSS before the bombs is its imports and nothing else.
    cases = bombs()
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    script = textwrap.dedent(f"""
        import json, resource, sys, time
        from pathlib import Path
        from skinlesion.image import ImageError, decode_image
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        results = {{}}
        for path in sorted(Path({str(tmp_path)!r}).iterdir()):
            started = time.monotonic()
            try:
                decode_image(path.read_bytes())
                results[path.name] = ["accepted", 0]
            except ImageError as exc:
                results[path.name] = [str(exc), time.monotonic() - started]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"grown_kib": after - before, "results": results}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(done.stdout.splitlines()[-1])
    for name, (_, expected) in cases.items():
        message, seconds = report["results"][name]
        assert re.search(expected, message), (name, message)
        assert seconds < 2, (name, seconds)
    assert report["grown_kib"] < 64 * 1024, report  # every bomb above would take gigabytes if decoded


def test_a_progressive_jpeg_is_refused_past_the_pixels_its_scans_cover_naming_the_limit() -> None:
    # Fewer scans than the scan limit, each over a whole 4 MP luminance: 0.1 s of decoding at the limit, 1 s for
    # 100 such scans of 16 MP, and all of it within one 16 kB read, where the CPU backstop cannot stop it.
    # libjpeg's 10 scans cover a 4:2:0 colour image's pixels 8 times, each repeated luminance scan once.
    side = 2048
    most = 10 + (MAX_JPEG_SCAN_PIXELS - 8 * side**2) // side**2
    assert most < MAX_JPEG_SCANS
    assert decode_image(progressive_scan_bomb(side, most, refinement=True)).mode == "RGB"
    with pytest.raises(ImageError, match=f"scans cover more than {MAX_JPEG_SCAN_PIXELS:,} pixels"):
        decode_image(progressive_scan_bomb(side, most + 1, refinement=True))


def test_the_scan_work_limit_passes_progressive_photos_up_to_its_size() -> None:
    # libjpeg's 10 scans of 4:2:0 colour cover 8x the pixels: 5000x3750 is exactly the limit, so a phone's 12 MP
    # progressive photo passes with room; two rows more do not. Baseline JPEGs are not counted, whatever their size.
    width, height = 5000, MAX_JPEG_SCAN_PIXELS // (8 * 5000)
    progressive = {"quality": 50, "progressive": True, "subsampling": "4:2:0"}
    assert decode_image(encode(Image.new("RGB", (width, height), (190, 120, 100)), "JPEG", **progressive))
    assert decode_image(encode(Image.new("RGB", (4032, 3024), (190, 120, 100)), "JPEG", **progressive))
    with pytest.raises(ImageError, match=f"scans cover more than {MAX_JPEG_SCAN_PIXELS:,} pixels"):
        decode_image(encode(Image.new("RGB", (width, height + 2), (190, 120, 100)), "JPEG", **progressive))
    assert decode_image(encode(Image.new("RGB", (8600, 5800), (190, 120, 100)), "JPEG", quality=50))


def test_a_jpeg_of_more_scans_than_any_camera_writes_is_refused_naming_the_limit() -> None:
    # Each scan passes over every coefficient again: 20,000 one-block scans of 16 MP took 24 s to decode.
    assert decode_image(progressive_scan_bomb(256, MAX_JPEG_SCANS)).size == (256, 256)
    with pytest.raises(ImageError, match=f"more than {MAX_JPEG_SCANS} scans"):  # an ImageError answers 400
        decode_image(progressive_scan_bomb(256, MAX_JPEG_SCANS + 1))


@pytest.mark.parametrize("data", [
    encode(photo((64, 48)), "JPEG", restart_marker_blocks=1),
    encode(photo((64, 48)), "JPEG", progressive=True, restart_marker_rows=1),
    encode(photo((64, 48)), "JPEG", icc_profile=bytes(200_000)),  # in 4 APP2 segments
    grey_png(idat_size=1),
], ids=["jpeg-restart-markers", "progressive-jpeg-restart-markers", "jpeg-200kB-icc-profile", "png-1-byte-idat-chunks"])
def test_the_structure_checks_pass_what_encoders_write(data: bytes) -> None:
    assert decode_image(data).mode == "RGB"


def test_the_chunk_limit_is_exact() -> None:
    filler = png_chunk(b"abCd", b"")  # IHDR, one IDAT and IEND make 3
    assert decode_image(grey_png(filler * (MAX_SEGMENTS - 3))).size == (24, 16)
    with pytest.raises(ImageError, match=f"more than {MAX_SEGMENTS:,} chunks"):
        decode_image(grey_png(filler * (MAX_SEGMENTS - 2)))


def test_the_cpu_time_backstop_stops_a_decode_the_structure_checks_let_through(monkeypatch: pytest.MonkeyPatch) -> None:
    # The scan limit lifted, 2,000 scans of 16 MP (2.4 s of CPU here) stand for work nothing else foresees.
    monkeypatch.setattr(skinlesion.image, "MAX_JPEG_SCANS", 10**9)
    monkeypatch.setattr(skinlesion.image, "MAX_JPEG_SCAN_PIXELS", 10**15)
    bomb = progressive_scan_bomb(4096, 2_000)
    started = time.thread_time()
    with pytest.raises(ImageError, match=f"over {MAX_DECODE_CPU_SECONDS:g} s of CPU time"):
        decode_image(bomb)
    assert time.thread_time() - started < MAX_DECODE_CPU_SECONDS + 0.9


def test_a_png_carrying_14_mb_of_exif_decodes_upright_in_bounded_time() -> None:
    # ImageOps.exif_transpose wrote the EXIF again without its orientation: 7 s and 1.4 GB for this one.
    count = 7_000_000
    entries = struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 0x9999, 3, count, 8 + 2 + 24 + 4)
    exif = b"II*\x00" + struct.pack("<IH", 8, 2) + entries + struct.pack("<I", 0) + b"\xff\xff" * count
    started = time.thread_time()
    image = decode_image(grey_png(png_chunk(b"eXIf", exif)))
    assert time.thread_time() - started < 1.0
    assert image.size == (16, 24)  # turned by orientation 6


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_images_are_refused_as_single_frame_only(predictor, fmt: str) -> None:
    frames = [photo(), photo().rotate(90), photo().rotate(180)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    status, payload = answer(predictor, {"image": base64.b64encode(data).decode()})
    assert_refused(status, payload)
    assert "single frame" in payload["error"]


def test_animated_gif_is_not_an_accepted_format(predictor) -> None:
    frames = [photo().convert("P"), photo().rotate(90).convert("P")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    status, payload = answer(predictor, {"image": base64.b64encode(data).decode()})
    assert_refused(status, payload)
    assert "not a decodable image" in payload["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"image": ""}, "empty"),
        ({"image": "data:image/png;base64,"}, "empty"),
        ({"image": " \n\t"}, "empty"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (b'{"image": "AAAA", "precision": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", "nested too deeply"),
        # Python refuses to parse integers over 4,300 digits with a plain ValueError, not a JSONDecodeError.
        (b'{"image": ' + b"1" * 5_000 + b"}", "4300 digits"),
        (b'{"image": "AAAA", "explain": -' + b"9" * 10_000 + b"}", "4300 digits"),
        ('{"image": "\ud800"}'.encode("utf-8", "surrogatepass"), "not UTF-8"),
        (b'{"image": "\\ud800"}', "not valid base64"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b'{"image": "' + JPEG_B64.encode() + b'", "image": 5}', "not a number|must be a base64 string"),
    ],
    ids=["empty-image", "empty-data-url", "whitespace-only", "deep-object", "deep-option", "huge-int-image",
         "huge-int-option", "lone-surrogate-utf8", "lone-surrogate-escape", "utf8-bom", "duplicate-key"],
)
def test_edge_bodies_are_400_envelopes(predictor, body, message: str) -> None:
    status, payload = answer(predictor, body)
    assert_refused(status, payload)
    assert re.search(message, payload["error"]), payload["error"]


def tiff_with_broken_second_page(tag: int, *, rename_to: int | None = None, value: int | None = None) -> bytes:
    """A two-page TIFF whose second page has `tag` renamed, or its SHORT value replaced: the shapes of the
    crashes fuzz/fuzz_decode.py found (Pillow reads the later pages only when decode_image counts them)."""
    buffer = io.BytesIO()
    photo().save(buffer, "TIFF", save_all=True, append_images=[photo()])
    data = bytearray(buffer.getvalue())
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    entries = range(second + 2, second + 2 + 12 * struct.unpack_from("<H", data, second)[0], 12)
    at = next(at for at in entries if struct.unpack_from("<H", data, at)[0] == tag)
    if rename_to is not None:
        struct.pack_into("<H", data, at, rename_to)
    else:
        struct.pack_into("<H", data, at + 8, value)
    return bytes(data)


@pytest.mark.parametrize("data", [tiff_with_broken_second_page(256, rename_to=0x8000),  # no ImageWidth: TypeError
                                  tiff_with_broken_second_page(259, value=33002)],  # unknown Compression: KeyError
                         ids=["page-without-width", "page-with-unknown-compression"])
def test_a_tiff_with_a_broken_later_page_is_a_400_not_a_crash(predictor, data: bytes) -> None:
    # Refused as multi-page from the first page's header: the broken page is never read.
    with pytest.raises(ImageError, match="multi-page"):
        decode_image(data)
    assert_refused(*answer(predictor, {"image": base64.b64encode(data).decode()}))


@pytest.mark.parametrize(("fmt", "size", "accepted"), [
    ("JPEG", (10_000, 5_000), True), ("JPEG", (2_217, 22_553), False),
    ("PNG", (4_000, 2_000), True), ("PNG", (8_000_001, 1), False),
], ids=["jpeg-exactly-50MP", "jpeg-50MP-plus-one", "png-exactly-8MP", "png-8MP-plus-one"])
def test_the_pixel_limits_are_exact(fmt: str, size: tuple[int, int], accepted: bool) -> None:
    limit = MAX_IMAGE_PIXELS if fmt == "JPEG" else MAX_FULL_DECODE_PIXELS
    assert size[0] * size[1] == limit + (0 if accepted else 1)
    data = encode(Image.new("L", size), fmt)
    if accepted:
        decoded = decode_image(data)
        # Bounded work: a large image is decoded or reduced to a longer side from 1024 to 2047 pixels.
        assert DECODED_MIN_SIDE <= max(decoded.size) < 2 * DECODED_MIN_SIDE
        assert decoded.width / decoded.height == pytest.approx(size[0] / size[1], rel=0.01)
    else:
        with pytest.raises(ImageError, match=f"at most {limit:,} pixels"):
            decode_image(data)


def test_a_many_page_tiff_is_refused_without_walking_its_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    # Walking the pages (n_frames) is quadratic in Pillow: minutes for the 130,000 pages that fit in 15 MB.
    seeks = []
    original = TiffImagePlugin.TiffImageFile._seek
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_seek", lambda self, frame: seeks.append(frame) or original(self, frame))
    with pytest.raises(ImageError, match="multi-page"):
        decode_image(many_page_tiff(10_000))
    assert seeks == [0]


def test_a_bad_body_in_a_batch_leaves_the_good_ones_alone(predictor) -> None:
    good = {"image": JPEG_B64}
    bomb = {"image": base64.b64encode(png_claiming(65_535, 65_535)).decode()}
    answers = respond(predictor, [good, b'{"image": ' + b"1" * 5_000 + b"}", bomb, good])
    assert [status for status, _ in answers] == [200, 400, 400, 200]
