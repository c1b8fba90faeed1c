"""Real photos at their own size through the real nginx and TorchServe, serving the shipped resnet34: the 70
original-quality HAM10000 photos (600x450, 190-410 KB), their 200x150 training copies and 1200x900 upscales of some
get the same domain score and label. Until the out-of-domain check read scale-free statistics, 68 of these 70 were
flagged "not a usable lesion photo"."""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from tests.conftest import HAM10000
from training.data import read_samples
from training.sources import ORIGINAL_QUALITY_BYTES

# Of the 70 original-quality photos, the shipped resnet34 flags 4 (5.7%), and flags their 200x150 training copies
# alike: lesions unlike the others, not their size (of all 220 full-size photos it flags 2.3%,
# tests/test_shipped_models.py). Their domain scores differ from their copies' by at most 0.19.
ORIGINALS_FLAGGED_AT_MOST = 4
SCORE_CHANGE_AT_MOST = 0.3


def predict(url: str, data: bytes) -> dict:
    body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def upscaled(path: Path, size: tuple[int, int] = (1200, 900)) -> bytes:
    data = io.BytesIO()
    Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(data, format="JPEG", quality=90)
    return data.getvalue()


def test_original_quality_photos_are_answered_as_lesions_at_their_size_and_upscaled(service, fullres_images) -> None:
    originals = [path for path in fullres_images if path.stat().st_size > ORIGINAL_QUALITY_BYTES]
    copies = {s.image_id: s.path for s in read_samples(HAM10000)}
    assert len(originals) == 70
    with ThreadPoolExecutor(4) as pool:
        given = list(pool.map(lambda path: predict(service.predict_url, path.read_bytes()), originals))
        small = list(pool.map(lambda path: predict(service.predict_url, copies[path.stem].read_bytes()), originals))
        larger = list(pool.map(lambda path: predict(service.predict_url, upscaled(path)), originals[::7]))
    assert all(answer["success"] and answer["model"] == "resnet34" for answer in given + small + larger)
    flagged = [path.name for path, answer in zip(originals, given, strict=True) if not answer["in_domain"]]
    assert len(flagged) <= ORIGINALS_FLAGGED_AT_MOST, flagged
    changes = [abs(a["domain_score"] - b["domain_score"]) for a, b in zip(given, small, strict=True)]
    changes += [abs(a["domain_score"] - b["domain_score"]) for a, b in zip(given[::7], larger, strict=True)]
    assert max(changes) < SCORE_CHANGE_AT_MOST
    assert sum(not answer["in_domain"] for answer in larger) <= 1
    same = [a["prediction"] == b["prediction"] for a, b in zip(given[::7], larger, strict=True)]
    assert sum(same) >= len(same) - 1
