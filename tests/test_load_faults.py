"""Sustained load and crashed workers, through real nginx and TorchServe.

Bounded versions of bench/load.py: 16 concurrent clients for a fixed number of requests, a worker
SIGKILLed under load, and a client.py batch that must survive a worker kill. Each test waits until the
killed worker is replaced, so the session's service is whole again for the tests after it. Which status
TorchServe gives the request on a killed worker is a race (500 or 507), so the envelope for each of its
failure statuses is checked against a stub TorchServe behind the real nginx configuration.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

import serve
from bench import load
from tests.conftest import ROOT, http_stub

# Generous: replacing a worker (a new Python process importing torch and loading the checkpoint) took
# 16 s on this 2-core machine while two training jobs held both cores.
REPLACED_WITHIN_S = 90


@pytest.fixture(scope="module")
def images(fullres_images) -> list[bytes]:
    return [p.read_bytes() for p in fullres_images[:8]]


def received_by(service, log_offset: int, model: str) -> list[str]:
    """Ids ("9002") of `model`'s workers that started an inference since log_offset in TorchServe's model log."""
    with open(service.run_dir / "torchserve" / "model_log.log", "rb") as log:
        log.seek(log_offset)
        lines = log.read().decode(errors="replace").splitlines()
    # A worker's lines are tagged with its thread's name, W-<id>-<model>_<version>.
    tagged = re.compile(rf"W-(\d+)-{re.escape(model)}_\S+ MODEL_LOG - Backend received inference")
    return [match[1] for line in lines if (match := tagged.search(line))]


def model_log_size(service) -> int:
    return (service.run_dir / "torchserve" / "model_log.log").stat().st_size


def kill_busy_worker(service, log_offset: int, busy: int, model: str, timeout: float = 60) -> tuple[int, float]:
    """Once `model`'s workers have started `busy` inferences since log_offset, SIGKILL the first one's; (pid, when)."""
    deadline = time.monotonic() + timeout
    while len(started := received_by(service, log_offset, model)) < busy:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{busy} requests did not reach the workers of {model} within {timeout:.0f} s")
        time.sleep(0.05)
    described = requests.get(f"{service.management_url}/models/{model}", timeout=10).json()[0]
    pid = next(int(w["pid"]) for w in described["workers"] if w["id"] == started[0])
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def test_sixteen_concurrent_clients_all_get_well_formed_answers(service, images) -> None:
    outcomes = load.run_load(service.url, images, total=48, concurrency=16, explain_every=12)
    table = load.summarize(outcomes)
    load.print_summary(table, max(o.started + o.seconds for o in outcomes) - min(o.started for o in outcomes))
    assert len(outcomes) == 48 and table["explain"]["requests"] == 4
    assert table["all"]["no answer"] == 0 and table["all"]["malformed"] == 0
    assert sum(o.verdict == "ok" for o in outcomes if o.kind != "explain") == 44, [o for o in outcomes if o.verdict != "ok"]
    # An explanation may be refused at once (503, the error envelope) when the ledger's measured wait behind the
    # others comes near the explanation deadline: on a slow or busy machine that is the documented answer.
    refused = [o for o in outcomes if o.kind == "explain" and o.verdict != "ok"]
    assert all(o.status == 503 and o.verdict == "envelope" and "retry in" in o.detail for o in refused), refused


def test_a_worker_killed_under_load_is_replaced_and_no_request_hangs(service, images) -> None:
    version, _ = load.default_workers(service.management_url)
    killed: list[load.Kill] = []

    def kill_once(answered: int) -> None:
        if answered == 8:
            killed.append(load.kill_worker(service.management_url, watcher))

    with ThreadPoolExecutor(1) as watcher:
        outcomes = load.run_load(service.url, images, total=64, concurrency=16, explain_every=0, on_answer=kill_once)
        replaced = killed[0].replaced.result() - killed[0].at  # waits for the replacement (or wait_replaced's timeout)
    print(f"worker {killed[0].pid} of {version} replaced after {replaced:.1f} s; answers: {load.summarize(outcomes)['all']}")
    assert len(outcomes) == 64
    assert all(o.status is not None for o in outcomes), "a request got no answer at all"
    assert max(o.seconds for o in outcomes) < 30  # the client's timeout for plain predictions: no hang
    failed = [o for o in outcomes if o.verdict != "ok"]
    # At most the batch on the killed worker fails, each request with an envelope; the other worker takes the queue.
    batch_size = yaml.safe_load((ROOT / "serving" / "model-config.yaml").read_text())["batchSize"]
    assert len(failed) <= batch_size and all(o.status in (500, 502, 503, 507) for o in failed), failed
    assert replaced < REPLACED_WITHIN_S
    after = load.run_load(service.url, images, total=8, concurrency=4, explain_every=0)
    assert [o.verdict for o in after] == ["ok"] * 8


def torchserve_failure(status: int) -> bytes:
    """TorchServe's own body for a failure status; its 413 comes with an empty body."""
    return b"" if status == 413 else json.dumps({"code": status, "type": "InternalServerException",
                                                 "message": "Worker died."}).encode()


@pytest.fixture
def proxy_to_stub(tmp_path: Path) -> Iterator[tuple[str, ThreadingHTTPServer]]:
    """The real nginx configuration in front of a stub TorchServe; (the /predict URL, the stub)."""
    with http_stub([]) as stub:
        port = serve.free_port()
        serve.start_nginx(tmp_path, f"127.0.0.1:{port}", [f"127.0.0.1:{stub.server_address[1]}"])
        try:  # nginx binds its port before `nginx` returns: no wait needed
            yield f"http://127.0.0.1:{port}/predict", stub
        finally:
            serve.stop_nginx(tmp_path)


# Every failure status TorchServe answers /predictions with by itself: 404 model not found, 413 body over
# max_request_size, 500 and 507 "Worker died." (507 when it has already seen the worker's exit status 137,
# i.e. SIGKILL or the OOM killer; 500 otherwise), 503 no worker free or job queue full.
@pytest.mark.parametrize(("status", "answered", "says"), [
    (404, 404, "not found"), (413, 413, "21 MiB"), (500, 500, "failed"), (503, 503, "unavailable"), (507, 500, "failed"),
])
def test_every_failure_torchserve_answers_reaches_the_client_as_an_envelope(
    proxy_to_stub, status: int, answered: int, says: str
) -> None:
    url, stub = proxy_to_stub
    stub.answers = [(status, torchserve_failure(status))]
    started = time.monotonic()
    response = requests.post(url, json={"image": "AAAA"}, timeout=30)
    assert time.monotonic() - started < 5
    assert response.status_code == answered
    payload = response.json()
    assert set(payload) == {"success", "error"} and payload["success"] is False, payload
    assert says in payload["error"]


def test_a_client_batch_survives_a_worker_kill(service, fullres_images) -> None:
    # Explanations: nginx replays them from "skin" on "skin-explain", whose worker is killed during one.
    _, pids = load.default_workers(service.management_url, "skin-explain")
    access_log = service.run_dir / "nginx" / "access.log"
    log_start = access_log.stat().st_size
    offset = model_log_size(service)
    paths = [str(p) for p in fullres_images[:3]]
    batch = subprocess.Popen([sys.executable, "client.py", "--url", service.predict_url, "--json", "--workers", "2",
                              "--explain", "--precision", "Low", *paths], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        pid, _ = kill_busy_worker(service, offset, busy=1, model="skin-explain")
        stdout, stderr = batch.communicate(timeout=300)
    finally:
        batch.kill()
    load.wait_replaced(service.management_url, pid, len(pids), timeout=300, model="skin-explain")
    with open(access_log, "rb") as log:
        log.seek(log_start)
        statuses = [line.split(b'"')[2].split()[0].decode() for line in log if b"POST /predict" in line]
    assert batch.returncode == 0, stderr
    assert [json.loads(line)["success"] for line in stdout.splitlines()] == [True] * 3
    # The killed worker's request failed once (500 or 507, see above) and was retried: a real failure survived.
    # While its replacement starts one worker is left, and admitted explanations whose replay never reached a worker
    # (any an earlier test left) count until their deadline (docs/explanations.md): a retry may be refused at once
    # as busy (503 with Retry-After, which the client waits out, saying so) before one is admitted.
    failures = [status for status in statuses if status != "200"]
    assert statuses.count("200") == 3 and len([s for s in failures if s in ("500", "507")]) == 1, (statuses, stderr)
    assert set(failures) <= {"500", "507", "503"}, (statuses, stderr)
    assert len(re.findall(r"; retrying in \d+ s", stderr)) == statuses.count("503"), (statuses, stderr)
