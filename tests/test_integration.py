"""Real TorchServe behind real nginx, over HTTP: the contract, bad input, size limits, faults."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

import serve
from skinlesion.model import CLASS_NAMES
from tests.conftest import ROOT, properties, ramp_image

BAD_BODIES = {
    "not json": b"{not json",
    "not an object": b"[1, 2, 3]",
    "image missing": b"{}",
    "image not a string": b'{"image": 12}',
    "invalid base64": b'{"image": "%%%%"}',
    "not an image": json.dumps({"image": base64.b64encode(b"plain text, not pixels").decode()}).encode(),
    "explain not a bool": None,
    "unknown precision": None,
    "unknown explain_class": None,
}


def post(service, body: bytes | dict, timeout: float = 60) -> requests.Response:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return requests.post(service.predict_url, data=data, headers={"Content-Type": "application/json"}, timeout=timeout)


def torchserve_requests(service, since: int) -> list[tuple[str, str, str]]:
    """(nginx's client port, path, status) per request TorchServe answered after offset `since` of its access log."""
    with open(service.run_dir / "torchserve" / "access_log.log", "rb") as log:
        log.seek(since)
        text = log.read().decode()
    return re.findall(r' - /127\.0\.0\.1:(\d+) "POST (\S+) HTTP/1\.1" (\d+)', text)


def torchserve_log_size(service) -> int:
    return (service.run_dir / "torchserve" / "access_log.log").stat().st_size


def worker_pids(service) -> set[str]:
    models = requests.get(f"{service.management_url}/models/skin/all", timeout=10).json()
    return {w["pid"] for m in models for w in m["workers"]}


def test_full_size_image_gets_a_success_envelope(service, image_b64) -> None:
    response = post(service, {"image": image_b64})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["model"] == "resnet34"
    assert body["prediction"] in CLASS_NAMES and 0 < body["probability"] <= 1
    assert {"malignant_probability", "malignancy_alert", "in_domain", "domain_score", "warnings"} <= set(body)
    assert list(body["probabilities"]) == list(CLASS_NAMES)
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)


def test_the_handler_times_its_stages_in_torchserve_metrics(service, image_b64) -> None:
    from bench.latency import handler_ms, skin_counters

    def counters() -> dict[str, float]:
        return skin_counters(requests.get(f"{service.metrics_url}/metrics", timeout=10).text)

    before = counters()
    for _ in range(3):
        assert post(service, {"image": image_b64}).status_code == 200
    time.sleep(1)  # the workers' metric lines reach the frontend asynchronously
    after = counters()
    assert after["HandlerRequests"] - before.get("HandlerRequests", 0) == 3
    stages = handler_ms(before, after)
    assert 1 <= stages["batch"] <= 3
    assert stages["decode"] > 0 and stages["preprocess"] > 0 and stages["forward"] > stages["preprocess"]


def test_every_answer_names_its_request_id(service, image_b64) -> None:
    plain = post(service, {"image": image_b64})
    explained = post(service, {"image": image_b64, "explain": True, "method": "gradcam"})
    refused = post(service, {})
    ids = [r.headers.get("X-Request-Id", "") for r in (plain, explained, refused)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 3, ids
    assert explained.status_code == 200 and refused.status_code == 400


def test_data_url_and_any_content_type_are_accepted(service, image_b64) -> None:
    body = json.dumps({"image": f"data:image/jpeg;base64,{image_b64}"})
    response = requests.post(service.predict_url, data=body, headers={"Content-Type": "text/plain"}, timeout=60)
    assert response.status_code == 200 and response.json()["success"] is True


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_input_gets_400_and_the_worker_keeps_serving(service, image_b64, case: str) -> None:
    body = BAD_BODIES[case] or {
        "explain not a bool": {"image": image_b64, "explain": "yes"},
        "unknown precision": {"image": image_b64, "explain": True, "precision": "Ultra"},
        "unknown explain_class": {"image": image_b64, "explain": True, "explain_class": "Mole"},
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


def test_get_model_is_the_served_default_versions_card(service) -> None:
    card = requests.get(f"{service.url}/model", timeout=30)
    assert card.status_code == 200
    card = card.json()
    assert card["success"] is True and card["architecture"] == card["version"] == "resnet34"
    assert card["calibrated"] is True and card["thresholds"]["out_of_domain"] > 0 and min(card["temperatures"].values()) > 0
    assert len(card["classes"]) == len(CLASS_NAMES) and card["test_metrics"]["test_images"] > 0
    try:
        serve.set_default(service.management_url, "resnet18")
        assert requests.get(f"{service.url}/model", timeout=30).json()["architecture"] == "resnet18"
    finally:
        serve.set_default(service.management_url, "resnet34")
    refused = requests.post(f"{service.url}/model", json={"image": "x"}, timeout=10)
    assert refused.status_code == 405 and refused.json()["success"] is False
    assert refused.headers["Allow"] == "GET, HEAD"


def test_a_generated_image_is_answered_out_of_domain_through_the_service(service) -> None:
    buffer = io.BytesIO()
    ramp_image().save(buffer, "PNG")
    response = post(service, {"image": base64.b64encode(buffer.getvalue()).decode()})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["prediction"] in CLASS_NAMES
    assert body["in_domain"] is False and [w["code"] for w in body["warnings"]] == ["out_of_domain"]
    assert isinstance(body["malignancy_alert"], bool) and 0 <= body["malignant_probability"] <= 1


def test_switching_the_default_version_changes_the_model(service, image_b64) -> None:
    try:
        serve.set_default(service.management_url, "resnet18")
        assert post(service, {"image": image_b64}).json()["model"] == "resnet18"
    finally:
        serve.set_default(service.management_url, "resnet34")
    assert post(service, {"image": image_b64}).json()["model"] == "resnet34"


@pytest.mark.parametrize(("method", "explain_class"), [("lime", None), ("gradcam", None), ("gradient", "Melanoma")])
def test_explain_at_low_returns_both_fields(service, image_b64, method: str, explain_class: str | None) -> None:
    body = {"image": image_b64, "explain": True, "precision": "Low", "method": method}
    response = post(service, {**body, "explain_class": explain_class} if explain_class else body, timeout=180)
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    pixels = body["explain"]
    assert max(len(pixels), len(pixels[0])) <= 300 and len(pixels[0][0]) == 3
    explained = explain_class or body["prediction"]
    assert body["explanation"]["method"] == method and body["explanation"]["label"] == explained
    overlay = Image.open(io.BytesIO(base64.b64decode(body["explanation"]["image_png"])))
    attribution = Image.open(io.BytesIO(base64.b64decode(body["explanation"]["attribution_png"])))
    assert overlay.format == attribution.format == "PNG" and attribution.mode == "L" and attribution.size == overlay.size
    assert body["explanation"]["check"]["probability"] == body["probabilities"][explained]
    assert all(0 <= value <= 1 for value in body["explanation"]["check"].values())


def test_explanations_are_replayed_on_the_explain_model_and_plain_ones_are_not(service, image_b64) -> None:
    since = torchserve_log_size(service)
    explained = post(service, {"image": image_b64, "explain": True, "method": "gradcam"})
    plain = post(service, {"image": image_b64})
    assert explained.status_code == 200 and explained.json()["explanation"]["method"] == "gradcam"
    assert plain.status_code == 200 and "explanation" not in plain.json()
    # The first pass is redirected unadmitted; after nginx's per-client rate, the admission pass is redirected again.
    assert [(path, status) for _, path, status in torchserve_requests(service, since)] == [
        ("/predictions/skin", "307"), ("/predictions/skin", "307"), ("/predictions/skin-explain", "200"),
        ("/predictions/skin", "200")]


def test_the_batching_model_redirects_explanations_to_the_explain_model(service, image_b64) -> None:
    # What nginx gets from TorchServe (and what anyone calling TorchServe directly would get).
    response = requests.post(f"{service.inference_url}/predictions/skin", json={"image": image_b64, "explain": True},
                             allow_redirects=False, timeout=60)
    assert response.status_code == 307 and response.headers["Location"] == "/predictions/skin-explain"
    assert response.json() == {"success": False, "error": response.json()["error"]}


def test_explanations_in_flight_do_not_hold_back_plain_predictions(service, image_b64) -> None:
    # Two explanations at once (Medium: seconds each) would hold both workers of a single pool; here they
    # hold the explain workers while the batching workers keep answering.
    explain = {"image": image_b64, "explain": True, "precision": "Medium"}
    with ThreadPoolExecutor(2) as explainers:
        explanations = [explainers.submit(post, service, explain, 300) for _ in range(2)]
        time.sleep(2)  # both are on the explain workers by now
        with ThreadPoolExecutor(4) as clients:
            answers = list(clients.map(lambda _: post(service, {"image": image_b64}), range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert not any(e.done() for e in explanations), "plain predictions waited for an explanation"
        assert [e.result().status_code for e in explanations] == [200, 200]


def test_nginx_keeps_its_connections_to_torchserve_open(service, image_b64) -> None:
    since = torchserve_log_size(service)
    for _ in range(6):
        assert post(service, {"image": image_b64}).status_code == 200
    ports = [port for port, _, _ in torchserve_requests(service, since)]
    # Without the upstream's keepalive, nginx would open a connection per request: six client ports.
    assert len(ports) == 6 and len(set(ports)) <= 2, ports


def frontend_pid(service) -> str:
    """TorchServe's Java frontend: the pid file it keeps in the instance's TMPDIR (serve.torchserve_env)."""
    return (service.run_dir / "tmp" / ".model_server.pid").read_text().strip()


def test_torchserve_runs_with_the_jvm_options_of_config_properties(service) -> None:
    # TorchServe reads `vmargs` itself when it builds the java command line; the C1-only compiler they set is
    # what keeps a fresh frontend's JIT warm-up short (config.properties, docs/performance.md).
    vmargs = properties(ROOT / "config.properties")["vmargs"].split()
    command = Path(f"/proc/{frontend_pid(service)}/cmdline").read_bytes().decode().split("\0")
    jvm_options = command[: command.index("org.pytorch.serve.ModelServer")]
    assert "-XX:TieredStopAtLevel=1" in jvm_options
    assert set(vmargs) <= set(jvm_options)


def test_the_benchmark_sees_the_frontends_jit_compiler_threads(service) -> None:
    # bench/latency.py warms up until these threads stop working: if it could not see them, it would stop at once.
    from bench.latency import jit_compiler_seconds

    tasks = Path("/proc") / frontend_pid(service) / "task"
    ours = {thread: seconds for thread, seconds in jit_compiler_seconds().items() if (tasks / str(thread)).exists()}
    assert ours and sum(ours.values()) > 0  # TorchServe's start alone compiles for well over a clock tick
