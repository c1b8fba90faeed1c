"""Coverage-guided fuzzing of the request path's parsing and image decoding (atheris on libFuzzer).

    .venv/bin/python fuzz/fuzz_decode.py -max_total_time=300 -timeout=20 -artifact_prefix=fuzz/crashes/ fuzz/corpus
    .venv/bin/python fuzz/fuzz_decode.py -runs=20000 fuzz/corpus          # a fixed number of inputs
    .venv/bin/python fuzz/fuzz_decode.py fuzz/crashes/crash-0123abcd...   # replay one input

Each input is used twice: as a /predict body (parse_request, then decode_image on its image) and as
image bytes (decode_image), which is how the fuzzer reaches the decoders fastest. RequestError and
ImageError are the expected refusals; anything else raised is a crash: libFuzzer stops, prints the
traceback and writes the input to crash-<sha1>. -timeout=S also reports an input that takes over S
seconds (a CPU bomb). Pillow's Python parsers (headers, PNG chunks, TIFF tags, EXIF) and skinlesion/
are instrumented for coverage; Pillow's C decoders are not (that needs a sanitizer build of Pillow),
so they are exercised without guidance. An empty corpus folder is first filled with seeds: small
images in every accepted format and mode, from a real HAM10000 photo when one is found, and JSON bodies.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import warnings
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent

with atheris.instrument_imports(include=["PIL", "skinlesion"]):
    from PIL import Image

    Image.init()  # Pillow imports its format plugins lazily: import them now, so they are instrumented too
    from bench.budget import progressive_scan_bomb  # not instrumented: only PIL and skinlesion are
    from serving.service import RequestError, parse_request
    from skinlesion.image import MAX_JPEG_SCANS, ImageError, decode_image

PHOTOS = Path(os.environ.get("SKIN_DATA_DIR", ROOT.parent / "shared" / "data")) / "ham10000-fullres"


def test_one_input(data: bytes) -> None:
    try:
        decode_image(parse_request(data).image)
    except (RequestError, ImageError):
        pass
    try:
        decode_image(data)
    except ImageError:
        pass


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def seeds() -> dict[str, bytes]:
    """Small, valid inputs that reach every format, mode and option the decoder handles."""
    photos = sorted(PHOTOS.glob("*.jpg"))
    base = Image.open(photos[0]).convert("RGB") if photos else Image.radial_gradient("L").convert("RGB")
    base = base.resize((48, 36))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated, so exif_transpose has work to do
    images = {
        "photo.jpg": encode(base, "JPEG", quality=80, exif=exif.tobytes()),
        "progressive.jpg": encode(base, "JPEG", progressive=True),
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "photo.png": encode(base, "PNG"),
        "palette.png": encode(base.convert("P"), "PNG"),
        "alpha.png": encode(base.convert("RGBA"), "PNG"),
        "grey16.png": encode(base.convert("L").convert("I;16"), "PNG"),
        "photo.webp": encode(base, "WEBP", quality=50),
        "lossless.webp": encode(base.convert("RGBA"), "WEBP", lossless=True),
        "photo.bmp": encode(base, "BMP"),
        "photo.tif": encode(base, "TIFF", compression="tiff_lzw"),
        "float.tif": encode(base.convert("F"), "TIFF"),
        "pages.tif": encode(base, "TIFF", save_all=True, append_images=[base.rotate(90)]),
        "unit-float.tif": encode(Image.linear_gradient("L").resize((48, 36)).point(lambda v: v / 255, "F"), "TIFF"),
        "lab.tif": encode(base.convert("LAB"), "TIFF"),
        "key-colour.png": encode(base.convert("L"), "PNG", transparency=0),
        "mpo.jpg": encode(base, "MPO", save_all=True, append_images=[base.convert("L").convert("RGB")]),
        "scans-at-limit.jpg": progressive_scan_bomb(48, MAX_JPEG_SCANS),
        "scan-bomb.jpg": progressive_scan_bomb(48, MAX_JPEG_SCANS + 1),
        # Within the scan limit, over the pixels the scans may cover (MAX_JPEG_SCAN_PIXELS).
        "scan-work-bomb.jpg": progressive_scan_bomb(2048, MAX_JPEG_SCANS, refinement=True),
    }
    bodies = {
        f"body-{name}.json": json.dumps({"image": base64.b64encode(data).decode(), "explain": i % 2 == 0,
                                         "precision": "low", "method": "gradcam"}).encode()
        for i, (name, data) in enumerate(images.items()) if name in ("photo.jpg", "photo.png", "pages.tif")
    }
    palette = base64.b64encode(images["palette.png"]).decode()
    bodies["body-data-url.json"] = json.dumps({"image": f"data:image/png;base64,{palette}"}).encode()
    return {**images, **bodies}


def main() -> None:
    # Pillow warns on every malformed tag or chunk; printing those would flood the log and slow the run.
    # decode_image still turns DecompressionBombWarning into an error inside its own catch_warnings().
    warnings.simplefilter("ignore")
    for arg in sys.argv[1:]:
        if arg.startswith("-artifact_prefix="):  # libFuzzer writes crash files there but does not create it
            os.makedirs(os.path.dirname(arg.split("=", 1)[1]) or ".", exist_ok=True)
    paths = [Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")]
    if paths and (not paths[0].exists() or paths[0].is_dir() and not any(paths[0].iterdir())):
        paths[0].mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            (paths[0] / name).write_bytes(data)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
