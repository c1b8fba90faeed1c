"""client.py: the CLI as a subprocess against the real service, and post_predict's retries against a stub server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

import client
from serve import free_port, set_default
from skinlesion.model import CLASS_NAMES
from tests.conftest import ROOT, http_stub, ramp_image


def run_client(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "client.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_one_image_prints_a_table_with_the_class(service, original_photo) -> None:
    result = run_client("--url", service.predict_url, str(original_photo))
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split()[:3] == ["file", "prediction", "probability"]
    assert row.startswith(str(original_photo))
    assert any(name in row for name in CLASS_NAMES)
    assert "resnet34" in row


def test_warnings_are_in_the_table_and_in_the_json(service, tmp_path: Path) -> None:
    noise = tmp_path / "noise.png"
    ramp_image().save(noise)
    table = run_client("--url", service.predict_url, str(noise))
    assert table.returncode == 0, table.stderr
    header, row, warning = table.stdout.splitlines()
    assert header.split()[-3:] == ["malignant", "model", "warnings"]
    assert row.split()[-1] == "out_of_domain"
    assert warning.startswith(f"{noise}: warning: this image does not look like")
    lines = run_client("--url", service.predict_url, "--json", str(noise)).stdout.splitlines()
    [answer] = [json.loads(line) for line in lines]
    assert answer["in_domain"] is False and answer["warnings"][0]["code"] == "out_of_domain"


def test_the_prediction_set_at_the_coverage_asked_is_in_the_table_and_the_json(service, original_photo) -> None:
    table = run_client("--url", service.predict_url, "--coverage", "0.95", str(original_photo))
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert "prediction set" in header
    [answer] = [json.loads(line) for line in run_client("--url", service.predict_url, "--coverage", "0.95", "--json",
                                                        str(original_photo)).stdout.splitlines()]
    assert answer["set_coverage"] == 0.95 and answer["prediction_set"][0] == answer["prediction"]
    assert "95%: " + ", ".join(answer["prediction_set"]) in row


def test_model_card_prints_the_served_card(service) -> None:
    result = run_client("--url", service.predict_url, "--model-card")
    assert result.returncode == 0, result.stderr
    card = json.loads(result.stdout)
    assert card["success"] is True and card["architecture"] == "resnet34" and card["calibrated"] is True


def test_several_images_as_json_lines(service, fullres_images) -> None:
    images = [str(p) for p in fullres_images[:3]]
    result = run_client("--url", service.predict_url, "--json", "--workers", "2", *images)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == images
    for line in lines:
        assert line["success"] is True
        assert line["prediction"] in CLASS_NAMES
        assert set(line["probabilities"]) == set(CLASS_NAMES)


def test_a_directory_is_expanded_to_its_images(service, fullres_images, tmp_path: Path) -> None:
    for image in fullres_images[:2]:
        (tmp_path / image.name).write_bytes(image.read_bytes())
    (tmp_path / "notes.md").write_text("not an image, and not picked up")
    result = run_client("--url", service.predict_url, "--json", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert [Path(json.loads(line)["file"]).name for line in result.stdout.splitlines()] == [p.name for p in fullres_images[:2]]


def test_explain_writes_the_explanation_png(service, fullres_images, tmp_path: Path) -> None:
    image = fullres_images[0]
    result = run_client("--url", service.predict_url, "--explain", "--precision", "Low", "--out", str(tmp_path), str(image),
                        timeout=200)
    assert result.returncode == 0, result.stderr
    png, attribution = tmp_path / f"{image.stem}_explain.png", tmp_path / f"{image.stem}_attribution.png"
    assert png.read_bytes()[:8] == attribution.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{png} and {attribution}" in result.stdout
    assert re.search(r"hiding the highlighted area (drops|raises|leaves) .+; a random area of the same size: \d\.\d\d",
                     result.stdout)


def test_explain_class_is_sent_and_a_bad_one_is_the_servers_400(service, original_photo) -> None:
    asked = run_client("--url", service.predict_url, "--explain", "--method", "gradcam", "--explain-class", "Melanoma",
                       "--json", str(original_photo))
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["explanation"]["label"] == "Melanoma"
    bad = run_client("--url", service.predict_url, "--explain", "--explain-class", "Mole", str(original_photo))
    assert bad.returncode == 1 and "'explain_class' must be one of the classes Actinic keratoses" in bad.stderr


def test_the_check_line_says_what_hiding_the_highlighted_area_did() -> None:
    explanation = {"label": "Melanoma", "check": {"probability": 0.712, "marked_hidden": 0.221, "random_hidden": 0.69}}
    assert client.check_line(explanation) == ("hiding the highlighted area drops Melanoma from 0.71 to 0.22; a random "
                                              "area of the same size: 0.69")
    assert client.check_line({"label": "Melanoma"}) is None


def test_a_missing_file_fails_by_name_and_the_others_still_run(service, fullres_images, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jpg"
    result = run_client("--url", service.predict_url, str(missing), str(fullres_images[0]))
    assert result.returncode == 1
    assert f"{missing}: no such file" in result.stderr
    assert str(fullres_images[0]) in result.stdout
    assert "Traceback" not in result.stderr


def test_a_non_image_file_shows_the_servers_error(service, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("these are notes, not a photo\n" * 10)
    result = run_client("--url", service.predict_url, str(text))
    assert result.returncode == 1
    assert "not a decodable image" in result.stderr
    assert result.stdout == ""


def test_an_unreachable_server_is_one_line_without_traceback(fullres_images) -> None:
    url = f"http://127.0.0.1:{free_port()}/predict"
    result = run_client("--url", url, str(fullres_images[0]))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert "unreachable" in line and url in line


@pytest.mark.parametrize("args", [[], ["--precision", "Extreme", "x.jpg"], ["--workers", "0", "x.jpg"], ["--out", "d", "x.jpg"],
                                  ["--use-model", "resnet50"], ["--coverage", "0.85", "x.jpg"],
                                  ["--explain-class", "Melanoma", "x.jpg"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = run_client(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_use_model_switches_the_default_version(service, fullres_images) -> None:
    try:
        result = run_client("--use-model", "resnet18", "--management-url", service.management_url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "default model: resnet18"
        result = run_client("--url", service.predict_url, "--json", str(fullres_images[0]))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["model"] == "resnet18"
    finally:
        set_default(service.management_url, "resnet34")


@pytest.fixture
def stub() -> Iterator[ThreadingHTTPServer]:
    with http_stub([]) as server:
        yield server


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff delays post_predict asks for, without waiting them out."""
    delays: list[float] = []
    monkeypatch.setattr(client.time, "sleep", delays.append)
    return delays


UNAVAILABLE = (503, b'{"success": false, "error": "the model server is unavailable"}')
OK = (200, json.dumps({"success": True, "prediction": CLASS_NAMES[0], "probability": 1.0}).encode())


def test_post_predict_retries_503_with_backoff_then_succeeds(stub, sleeps: list[float]) -> None:
    stub.answers = [UNAVAILABLE, UNAVAILABLE, OK]
    assert client.post_predict(stub.url, b"image")["success"] is True
    assert stub.hits == 3
    assert sleeps == [0.5, 1.0]


def test_post_predict_returns_the_failure_envelope_when_retries_run_out(stub, sleeps: list[float]) -> None:
    stub.answers = [UNAVAILABLE]
    assert client.post_predict(stub.url, b"image", retries=2) == json.loads(UNAVAILABLE[1])
    assert stub.hits == 3
    assert sleeps == [0.5, 1.0]


def test_post_predict_does_not_retry_client_mistakes(stub, sleeps: list[float]) -> None:
    stub.answers = [(400, b'{"success": false, "error": "bad"}'), OK]
    assert client.post_predict(stub.url, b"image") == {"success": False, "error": "bad"}
    assert stub.hits == 1 and sleeps == []


def test_post_predict_non_json_body_raises_client_error(stub, sleeps: list[float]) -> None:
    stub.answers = [(200, b"<html>hello</html>")]
    with pytest.raises(client.ClientError, match="non-JSON body"):
        client.post_predict(stub.url, b"image")


def test_post_predict_unreachable_raises_client_error_after_retries(sleeps: list[float]) -> None:
    with pytest.raises(client.ClientError, match="unreachable \\(connection refused; tried 4 times\\)"):
        client.post_predict(f"http://127.0.0.1:{free_port()}/predict", b"image")
    assert sleeps == [0.5, 1.0, 2.0]


def test_post_predict_timeout_raises_client_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(*args, **kwargs):
        assert kwargs["timeout"] == client.TIMEOUTS["explain"]
        raise requests.ReadTimeout("read timed out")

    monkeypatch.setattr(client.requests, "post", slow)
    with pytest.raises(client.ClientError, match="did not answer within 210 s"):
        client.post_predict("http://127.0.0.1:9/predict", b"image", explain=True, precision="High")


def test_explanation_names_never_collide() -> None:
    paths = [Path("a/mole.jpg"), Path("b/mole.jpg"), Path("b/mole.png"), Path("c/other.jpg"), Path("x/a/mole.jpg"),
             Path("mole.jpg")]
    assert list(client.explanation_names(paths).values()) == [
        "a_mole_explain.png", "b_mole_explain.png", "b_mole_2_explain.png", "other_explain.png", "a_mole_2_explain.png",
        "mole_explain.png"]
    assert list(client.explanation_names([Path("a/mole.jpg"), Path("b/mole.jpg")]).values()) == [
        "a_mole_explain.png", "b_mole_explain.png"]


@pytest.mark.parametrize("paths", [
    ["a/mole.jpg", "x/a/mole.jpg", "d/1_a_mole.jpg"],  # both a/mole.jpg and d/1_a_mole.jpg wrote 1_a_mole_explain.png
    ["a/mole.jpg", "b/mole.jpg", "a/mole_2.jpg"],
    ["a/Mole.jpg", "b/mole.jpg"],  # one file on a case-insensitive file system
], ids=["made-name-is-an-input", "suffix-is-an-input", "case-only"])
def test_explanation_names_are_distinct_whatever_the_inputs_are_called(paths: list[str]) -> None:
    names = client.explanation_names([Path(path) for path in paths]).values()
    assert len({name.casefold() for name in names}) == len(paths)


def test_explanations_of_same_named_images_are_all_saved(service, fullres_images, tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mole.jpg").write_bytes(fullres_images[0].read_bytes())
    out = tmp_path / "out"
    result = run_client("--url", service.predict_url, "--explain", "--method", "gradcam", "--out", str(out),
                        str(tmp_path / "a" / "mole.jpg"), str(tmp_path / "b" / "mole.jpg"), timeout=200)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_mole_attribution.png", "a_mole_explain.png",
                                                     "b_mole_attribution.png", "b_mole_explain.png"]


class Redirecting(BaseHTTPRequestHandler):
    """Answers every POST with a 307 to the server's `.target`."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(307)
        self.send_header("Location", self.server.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_redirect_is_not_followed(sleeps: list[float]) -> None:
    with http_stub([(200, b'{"success": true}')]) as elsewhere:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
        server.target = elsewhere.url
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            answer = client.post_predict(f"http://127.0.0.1:{server.server_address[1]}/predict", b"image bytes")
        finally:
            server.shutdown()
            server.server_close()
    assert answer["success"] is False and "redirect" in answer["error"] and elsewhere.url in answer["error"]
    assert elsewhere.hits == 0


def test_the_answer_cache_is_bounded_and_keeps_no_pixel_arrays() -> None:
    cache = client.AnswerCache(2)
    answer = {"success": True, "prediction": "x", "explain": [[[0, 0, 0]]], "explanation": {"image_png": "..."}}
    assert cache.put("a", answer) == {k: v for k, v in answer.items() if k != "explain"}
    cache.put("b", {"success": True})
    assert cache.get("a") is not None  # now the most recent
    cache.put("c", {"success": True})
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert "explain" not in cache.get("a")
    failed = {"success": False, "error": "busy"}
    assert cache.put("d", failed) == failed and cache.get("d") is None  # failures are asked again


def test_a_busy_503_is_retried_after_its_retry_after(stub, sleeps: list[float]) -> None:
    busy = b'{"success": false, "error": "explanations are busy: 3 ahead"}'
    stub.answers = [(503, busy, {"Retry-After": "7"}), (503, busy, {"Retry-After": "5"}), OK]
    told: list[tuple[float, str]] = []
    answer = client.post_predict(stub.url, b"img", explain=True, on_busy=lambda s, m: told.append((s, m)))
    assert answer["success"] is True and stub.hits == 3
    assert sleeps == [7.0, 5.0] and told == [(7.0, "explanations are busy: 3 ahead"), (5.0, "explanations are busy: 3 ahead")]


def test_busy_waits_are_bounded_in_all(stub, sleeps: list[float]) -> None:
    stub.answers = [(503, b'{"success": false, "error": "explanations are busy"}', {"Retry-After": "200"})]
    answer = client.post_predict(stub.url, b"img", explain=True, max_busy_wait=300)
    assert answer["success"] is False and "gave up after waiting 200 s in all" in answer["error"]
    assert sleeps == [200.0] and stub.hits == 2


BUSY = b'{"success": false, "error": "explanations are busy"}'


@pytest.mark.parametrize(("header", "waits"), [
    ("0", [1.0] * 5), ("-5", [1.0] * 5), ("0.001", [1.0] * 5),  # floored at a second: 5 tries in 5 s, then give up
    ("nan", [0.5, 1.0, 2.0]), ("inf", [0.5, 1.0, 2.0]), ("soon", [0.5, 1.0, 2.0]),  # not a wait: a plain 503
])
def test_a_retry_after_under_a_second_or_not_a_number_cannot_resend_without_pause(
        stub, monkeypatch: pytest.MonkeyPatch, header: str, waits: list[float]) -> None:
    # "0" and "nan" resent at once, without end: over 5,000 requests before.
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        assert len(sleeps) < 100, "resent without end"

    monkeypatch.setattr(client.time, "sleep", sleep)
    stub.answers = [(503, BUSY, {"Retry-After": header})]
    answer = client.post_predict(stub.url, b"img", explain=True, max_busy_wait=5)
    assert answer["success"] is False and sleeps == waits and stub.hits == len(waits) + 1
