"""Memory and time budget of the worst small requests, through the public door (nginx).

    .venv/bin/python bench/budget.py [--model resnet34] [--repeat 3]

Starts its own service (free loopback ports, archives from model_store/), then sends each case: a 600x450
lesion photo (the reference), and requests of at most 15 MB that claim far more than a photo needs (huge
solid-colour images, a 16-bit and a transparent palette image, a JPEG at the pixel limit, a TIFF of many
pages, progressive JPEGs at and over the limits on their scans), plainly and with explanations. Before each request
the peak resident memory of every TorchServe worker is reset (/proc/PID/clear_refs, root only); after it, the
largest peak is read (VmHWM). The table gives per case: body size, HTTP status, median wall time, its ratio
to the reference request of the same kind, and the peak worker memory. Targets (issue: bounded work per
request): at most 1.5 GB resident and at most 3x the reference's time; for a body over 10 MB the reference is
at least the time a body of that size takes to send and parse (measured first, a 14.7 MB body of zeros). Exit
status 1 when a case misses.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import re
import statistics
import struct
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
from PIL import Image

import serve
from bench.load import DATA, client_address, started_service
from skinlesion.image import END_OF_ENTROPY_CODED_DATA, MAX_JPEG_SCAN_PIXELS, MAX_JPEG_SCANS

MEMORY_LIMIT_BYTES = 1.5 * 2**30
TIME_RATIO_LIMIT = 3.0
KINDS = {
    "plain": {},
    "gradcam": {"explain": True, "method": "gradcam"},
    "lime Low": {"explain": True, "method": "lime", "precision": "Low"},
}


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def many_page_tiff(pages: int, side: int = 16) -> bytes:
    """A little-endian TIFF of `pages` grey side x side pages sharing one strip, one IFD each, built directly
    (Pillow's writer is slow)."""
    pixels = side * side
    entries = [(256, 3, 1, side), (257, 3, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 3, 1, side), (279, 4, 1, pixels)]
    ifd_size = 2 + 12 * len(entries) + 4
    first = 8 + pixels
    out = bytearray(b"II*\x00" + struct.pack("<I", first) + b"\x80" * pixels)
    for page in range(pages):
        following = first + (page + 1) * ifd_size if page + 1 < pages else 0
        out += struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack("<HHII", tag, kind, count, value)
        out += struct.pack("<I", following)
    return bytes(out)


def progressive_scan_bomb(side: int, scans: int, refinement: bool = False) -> bytes:
    """A side x side progressive JPEG of `scans` scans: libjpeg's 10-scan script for a solid colour with one of
    its luminance scans repeated, some 30 bytes each (with the tables before it). Every scan makes libjpeg pass
    over all the luminance's blocks again: the first AC scan, 1.2 ms a scan at 4096x4096 here, or with
    `refinement` the last AC refinement, which tests each block's 63 coefficients again (9.8 ms a scan)."""
    data = encoded(Image.new("RGB", (side, side), (190, 120, 100)), "JPEG", progressive=True, quality=50)
    starts = [found.start() for found in re.finditer(rb"\xff\xda", data)]  # SOS: no other bytes of this file match
    ends = [END_OF_ENTROPY_CODED_DATA.search(data, start + 2).start() for start in starts]
    repeated = len(starts) - 1 if refinement else 1
    after, end = ends[repeated - 1], ends[repeated]
    return data[:end] + data[after:end] * (scans - len(starts)) + data[end:]


def cases(photo: bytes) -> list[tuple[str, bytes, str]]:
    """(name, image bytes, kind) for every case; the first of each kind is its reference."""
    jpeg_side, lossless_side = (8600, 5800), (3450, 2300)  # 49.9 MP and 7.9 MP: just under the limits
    palette = Image.new("P", lossless_side, 0)
    palette.putpalette([190, 120, 100] * 256)
    # libjpeg's 10 scans of a 4:2:0 image cover 8x its pixels, and each repeated luminance scan 1x.
    most_scans = 10 + (MAX_JPEG_SCAN_PIXELS - 8 * 2048**2) // 2048**2
    images = {
        "600x450 photo (reference)": photo,
        "49.9 MP JPEG": encoded(Image.new("RGB", jpeg_side, (190, 120, 100)), "JPEG", quality=50),
        "7.9 MP solid PNG": encoded(Image.new("RGB", lossless_side, (190, 120, 100)), "PNG"),
        "7.9 MP 16-bit PNG": encoded(Image.fromarray(np.full(lossless_side[::-1], 40_000, dtype=np.uint16)), "PNG"),
        "7.9 MP palette PNG, transparent": encoded(palette, "PNG", transparency=0),
        "49.9 MP solid PNG (refused)": encoded(Image.new("RGB", jpeg_side, (190, 120, 100)), "PNG"),
        "TIFF of 130,000 pages (refused)": many_page_tiff(130_000),
        # Progressive JPEGs at the limit on their scans' work (MAX_JPEG_SCAN_PIXELS): a photo's 10 scans at the
        # most pixels, and the scan that costs the most repeated on 4 MP; then one scan more, and a scan bomb.
        "18.75 MP progressive JPEG": encoded(Image.new("RGB", (5000, 3750), (190, 120, 100)), "JPEG",
                                             quality=50, progressive=True),
        f"4.2 MP JPEG of {most_scans} refinement scans": progressive_scan_bomb(2048, most_scans, refinement=True),
        f"4.2 MP JPEG of {most_scans + 1} scans (refused)": progressive_scan_bomb(2048, most_scans + 1, refinement=True),
        f"1 MP JPEG of {MAX_JPEG_SCANS} refinement scans": progressive_scan_bomb(1024, MAX_JPEG_SCANS, refinement=True),
        "16 MP JPEG of 20,000 scans (refused)": progressive_scan_bomb(4096, 20_000),
    }
    plain = [(name, data, "plain") for name, data in images.items()]
    explained = [(name, images[name], kind) for kind in ("gradcam", "lime Low")
                 for name in ("600x450 photo (reference)", "49.9 MP JPEG", "7.9 MP solid PNG")]
    return plain + explained


def worker_pids(management: str) -> list[int]:
    pids = []
    for model in serve.MODELS:
        for version in requests.get(f"{management}/models/{model}/all", timeout=10).json():
            pids += [int(w["pid"]) for w in version["workers"]]
    return pids


def reset_peaks(pids: list[int]) -> None:
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_bytes(pids: list[int]) -> int:
    peaks = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) * 1024)
    return max(peaks)


def post(url: str, body: bytes, source: str) -> int:
    """POST /predict from loopback address `source` (nginx limits explanations per client address)."""
    target = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=300, source_address=(source, 0))
    try:
        connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def measure(url: str, pids: Callable[[], list[int]], body: bytes, repeat: int, source: str) -> tuple[int, float, int]:
    """(status, median seconds, peak worker bytes) of `repeat` identical requests from `source`."""
    seconds, peak, status = [], 0, 0
    for _ in range(repeat):
        current = pids()
        reset_peaks(current)
        started = time.perf_counter()
        status = post(url, body, source)
        seconds.append(time.perf_counter() - started)
        peak = max(peak, peak_bytes(current))
    return status, statistics.median(seconds), peak


def run(url: str, management: str, repeat: int) -> int:
    photo = sorted(DATA.glob("*.jpg"))[0].read_bytes()
    # A body of the largest size, refused as soon as it is parsed: what any 15 MB request costs to send and read.
    _, floor, _ = measure(url, lambda: worker_pids(management),
                          json.dumps({"image": base64.b64encode(b"\0" * 11_000_000).decode()}).encode(), repeat,
                          client_address(0))
    print(f"a 14.7 MB body refused after parsing: {floor:.3f} s (the larger reference for bodies over 10 MB)")
    references: dict[str, float] = {}
    missed = 0
    print(f"{'case':<34} {'kind':<9} {'body':>9} {'status':>6} {'seconds':>8} {'x ref':>6} {'peak RSS':>9}")
    for number, (name, image, kind) in enumerate(cases(photo), start=1):
        body = json.dumps({"image": base64.b64encode(image).decode(), **KINDS[kind]}).encode()
        status, seconds, peak = measure(url, lambda: worker_pids(management), body, repeat, client_address(number))
        references.setdefault(kind, seconds)
        ratio = seconds / max(references[kind], floor if len(body) > 10_000_000 else 0.0)
        over = peak > MEMORY_LIMIT_BYTES or ratio > TIME_RATIO_LIMIT
        missed += over
        print(f"{name:<34} {kind:<9} {len(body) / 1e6:>7.2f}MB {status:>6} {seconds:>8.3f} {ratio:>6.2f} "
              f"{peak / 2**30:>7.2f}GB" + ("  MISSED" if over else ""), flush=True)
    print(f"targets: peak worker RSS <= {MEMORY_LIMIT_BYTES / 2**30:.1f} GB, time <= {TIME_RATIO_LIMIT:g}x the reference")
    return 1 if missed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet34", help="default version")
    parser.add_argument("--repeat", type=int, default=3, help="requests per case (the median time is reported)")
    args = parser.parse_args(argv)
    with started_service("skin-budget-", args.model) as (url, management, _):
        return run(url, management, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
