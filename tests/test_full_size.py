"""Real photos at their own size through the real nginx and TorchServe, serving the shipped resnet34: the 70
original-quality HAM10000 photos (600x450, 190-410 KB) and 1200x900 upscales of some are answered as lesions.
Until the out-of-domain check read scale-free statistics, 68 of these 70 were flagged "not a usable lesion photo"."""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT, own_service
from training.sources import ORIGINAL_QUALITY_BYTES

# The largest share of real lesion photos the check may flag, at any source size (issue: real photos at their size).
FLAGGED_AT_MOST = 0.05


@pytest.fixture(scope="module")
def shipped_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    with own_service(tmp_path_factory.mktemp("shipped"), ROOT / "model_store") as service:
        yield service.predict_url


def predict(url: str, data: bytes) -> dict:
    body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def upscaled(path: Path, size: tuple[int, int] = (1200, 900)) -> bytes:
    data = io.BytesIO()
    Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(data, format="JPEG", quality=90)
    return data.getvalue()


def test_original_quality_photos_are_answered_as_lesions_at_their_size_and_upscaled(shipped_url: str,
                                                                                     fullres_images) -> None:
    originals = [path for path in fullres_images if path.stat().st_size > ORIGINAL_QUALITY_BYTES]
    assert len(originals) == 70
    with ThreadPoolExecutor(4) as pool:
        given = list(pool.map(lambda path: predict(shipped_url, path.read_bytes()), originals))
        larger = list(pool.map(lambda path: predict(shipped_url, upscaled(path)), originals[::7]))
    assert all(answer["success"] and answer["model"] == "resnet34" for answer in given + larger)
    flagged = [path.name for path, answer in zip(originals, given, strict=True) if not answer["in_domain"]]
    assert len(flagged) <= FLAGGED_AT_MOST * len(originals), flagged
    assert sum(not answer["in_domain"] for answer in larger) <= 1
    same = [a["prediction"] == b["prediction"] for a, b in zip(given[::7], larger, strict=True)]
    assert sum(same) >= len(same) - 1
