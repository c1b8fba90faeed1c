"""Real TorchServe behind real nginx, over HTTP: the contract, bad input, size limits, faults."""

from __future__ import annotations

import base64
import json
import time

import pytest
import requests

import serve
from skinlesion.model import CLASS_NAMES

BAD_BODIES = {
    "not json": b"{not json",
    "not an object": b"[1, 2, 3]",
    "image missing": b"{}",
    "image not a string": b'{"image": 12}',
    "invalid base64": b'{"image": "%%%%"}',
    "not an image": json.dumps({"image": base64.b64encode(b"plain text, not pixels").decode()}).encode(),
    "explain not a bool": None,
    "unknown precision": None,
}


def post(service, body: bytes | dict, timeout: float = 60) -> requests.Response:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return requests.post(service.predict_url, data=data, headers={"Content-Type": "application/json"}, timeout=timeout)


def worker_pids(service) -> set[str]:
    models = requests.get(f"{service.management_url}/models/skin/all", timeout=10).json()
    return {w["pid"] for m in models for w in m["workers"]}


def test_full_size_image_gets_a_success_envelope(service, image_b64) -> None:
    response = post(service, {"image": image_b64})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["model"] == "resnet34"
    assert body["prediction"] in CLASS_NAMES and 0 < body["probability"] <= 1
    assert list(body["probabilities"]) == list(CLASS_NAMES)
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)


def test_data_url_and_any_content_type_are_accepted(service, image_b64) -> None:
    body = json.dumps({"image": f"data:image/jpeg;base64,{image_b64}"})
    response = requests.post(service.predict_url, data=body, headers={"Content-Type": "text/plain"}, timeout=60)
    assert response.status_code == 200 and response.json()["success"] is True


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_input_gets_400_and_the_worker_keeps_serving(service, image_b64, case: str) -> None:
    body = BAD_BODIES[case] or {
        "explain not a bool": {"image": image_b64, "explain": "yes"},
        "unknown precision": {"image": image_b64, "explain": True, "precision": "Ultra"},
    }[case]
    before = worker_pids(service)
    response = post(service, body)
    assert response.status_code == 400
    assert response.json()["success"] is False and response.json()["error"]
    after_good = post(service, {"image": image_b64})
    assert after_good.status_code == 200 and after_good.json()["success"] is True
    assert worker_pids(service) == before


def test_oversized_body_gets_413_envelope(service) -> None:
    response = post(service, {"image": "A" * (22 * 1024 * 1024)})
    assert response.status_code == 413
    assert response.json()["success"] is False and "21 MiB" in response.json()["error"]


def test_body_just_under_the_limit_reaches_the_model_server(service) -> None:
    # 20 MiB of valid base64 that is not an image: past nginx and TorchServe, refused by the decoder.
    response = post(service, {"image": base64.b64encode(b"\0" * (15 * 1024 * 1024)).decode()}, timeout=120)
    assert response.status_code == 400 and "not a decodable image" in response.json()["error"]


@pytest.mark.parametrize("path", ["/models", "/models/skin", "/metrics", "/ping", "/predictions/skin", "/api-description"])
def test_management_metrics_and_torchserve_paths_are_not_proxied(service, path: str) -> None:
    for method in ("GET", "POST"):
        response = requests.request(method, service.url + path, timeout=10)
        assert response.status_code == 404
        assert response.json()["success"] is False


def test_wrong_method_and_health(service) -> None:
    response = requests.get(service.predict_url, timeout=10)
    assert response.status_code == 405 and response.json()["success"] is False
    assert response.headers["Allow"] == "POST"
    health = requests.get(f"{service.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "Healthy"


def test_switching_the_default_version_changes_the_model(service, image_b64) -> None:
    try:
        serve.set_default(service.management_url, "resnet18")
        assert post(service, {"image": image_b64}).json()["model"] == "resnet18"
    finally:
        serve.set_default(service.management_url, "resnet34")
    assert post(service, {"image": image_b64}).json()["model"] == "resnet34"


def test_torchserve_down_gets_a_fast_envelope_and_comes_back(service, image_b64) -> None:
    serve.stop_torchserve(service.run_dir)
    try:
        started = time.monotonic()
        response = post(service, {"image": image_b64}, timeout=30)
        # Refused connections fail at once; the bound leaves room for a loaded CI machine.
        assert time.monotonic() - started < 5
        assert response.status_code == 503
        assert response.json() == {"success": False, "error": response.json()["error"]}
        assert "unavailable" in response.json()["error"]
        health = requests.get(f"{service.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["success"] is False
    finally:
        service.start()
    assert post(service, {"image": image_b64}).json()["success"] is True


@pytest.mark.parametrize("method", ["lime", "gradcam"])
def test_explain_at_low_returns_both_fields(service, image_b64, method: str) -> None:
    response = post(service, {"image": image_b64, "explain": True, "precision": "Low", "method": method}, timeout=180)
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    pixels = body["explain"]
    assert max(len(pixels), len(pixels[0])) <= 300 and len(pixels[0][0]) == 3
    assert body["explanation"]["method"] == method and body["explanation"]["label"] == body["prediction"]
    png = base64.b64decode(body["explanation"]["image_png"])
    assert png.startswith(b"\x89PNG")
