"""Sustained load and crashed workers, through real nginx and TorchServe (random weights).

Bounded versions of bench/load.py: 16 concurrent clients for a fixed number of requests, a worker
SIGKILLed under load, and a client.py batch that must survive a worker kill. Each test waits until the
killed worker is replaced, so the session's service is whole again for the tests after it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from bench import load

ROOT = Path(__file__).resolve().parent.parent
# Generous: replacing a worker (a new Python process importing torch and loading the checkpoint) took
# 16 s on this 2-core machine while two training jobs held both cores.
REPLACED_WITHIN_S = 90


@pytest.fixture(scope="module")
def images(fullres_images) -> list[bytes]:
    return [p.read_bytes() for p in fullres_images[:8]]


def received_by(service, log_offset: int) -> list[str]:
    """Worker ids ("9002") that started an inference since log_offset in TorchServe's model log."""
    with open(service.run_dir / "torchserve" / "model_log.log", "rb") as log:
        log.seek(log_offset)
        lines = log.read().decode(errors="replace").splitlines()
    return [line.split("W-", 1)[1].split("-", 1)[0] for line in lines if "Backend received inference" in line and "W-" in line]


def model_log_size(service) -> int:
    return (service.run_dir / "torchserve" / "model_log.log").stat().st_size


def kill_busy_worker(service, log_offset: int, busy: int, timeout: float = 60) -> tuple[int, float]:
    """Once `busy` inferences have started since log_offset, SIGKILL the worker of the first; (pid, when)."""
    deadline = time.monotonic() + timeout
    while len(started := received_by(service, log_offset)) < busy:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{busy} requests did not reach the workers within {timeout:.0f} s")
        time.sleep(0.05)
    described = requests.get(f"{service.management_url}/models/skin", timeout=10).json()[0]
    pid = next(int(w["pid"]) for w in described["workers"] if w["id"] == started[0])
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def test_sixteen_concurrent_clients_all_get_well_formed_answers(service, images) -> None:
    outcomes = load.run_load(service.url, images, total=48, concurrency=16, explain_every=12)
    table = load.summarize(outcomes)
    load.print_summary(table, max(o.started + o.seconds for o in outcomes) - min(o.started for o in outcomes))
    assert len(outcomes) == 48 and table["explain"]["requests"] == 4
    assert table["all"]["no answer"] == 0 and table["all"]["malformed"] == 0
    assert table["all"]["ok"] == 48, [o for o in outcomes if o.verdict != "ok"]


def test_a_worker_killed_under_load_is_replaced_and_no_request_hangs(service, images) -> None:
    version, pids = load.default_workers(service.management_url)
    killed: list[tuple[int, float]] = []

    def kill_once(answered: int) -> None:
        if answered == 8:
            killed.append(load.kill_worker(service.management_url))

    outcomes = load.run_load(service.url, images, total=64, concurrency=16, explain_every=0, on_answer=kill_once)
    pid, at = killed[0]
    replaced = load.wait_replaced(service.management_url, pid, len(pids), timeout=300) - at
    print(f"worker {pid} of {version} replaced after {replaced:.1f} s; answers: {load.summarize(outcomes)['all']}")
    assert len(outcomes) == 64
    assert all(o.status is not None for o in outcomes), "a request got no answer at all"
    assert max(o.seconds for o in outcomes) < 30  # the client's timeout for plain predictions: no hang
    failed = [o for o in outcomes if o.verdict != "ok"]
    # Batches of one: at most the one request on the killed worker fails; the other worker takes the queue.
    assert len(failed) <= 1 and all(o.status in (500, 502, 503, 507) for o in failed), failed
    assert replaced < REPLACED_WITHIN_S
    after = load.run_load(service.url, images, total=8, concurrency=4, explain_every=0)
    assert [o.verdict for o in after] == ["ok"] * 8


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="nginx passes TorchServe's 507 'Worker died.' through in TorchServe's own JSON: "
                   "proxy/nginx.conf's `error_page 502 503 = @unavailable` needs 507 too")
def test_the_request_on_a_killed_worker_gets_the_failure_envelope(service, images) -> None:
    _, pids = load.default_workers(service.management_url)
    offset = model_log_size(service)
    body = {"image": base64.b64encode(images[0]).decode(), "explain": True, "precision": "Low"}
    with ThreadPoolExecutor(2) as pool:
        # Two LIME explanations hold both workers of the default version for seconds: kill one of them.
        futures = [pool.submit(requests.post, service.predict_url, json=body, timeout=120) for _ in range(2)]
        pid, _ = kill_busy_worker(service, offset, busy=2)
        answers = [f.result() for f in futures]
    load.wait_replaced(service.management_url, pid, len(pids), timeout=300)
    [failed] = [a for a in answers if a.status_code != 200]
    assert failed.status_code == 503
    assert failed.json() == {"success": False, "error": failed.json()["error"]}


def test_a_client_batch_survives_a_worker_kill(service, fullres_images) -> None:
    _, pids = load.default_workers(service.management_url)
    access_log = service.run_dir / "nginx" / "access.log"
    log_start = access_log.stat().st_size
    offset = model_log_size(service)
    paths = [str(p) for p in fullres_images[:3]]
    batch = subprocess.Popen([sys.executable, "client.py", "--url", service.predict_url, "--json", "--workers", "2",
                              "--explain", "--precision", "Low", *paths], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        pid, _ = kill_busy_worker(service, offset, busy=2)
        stdout, stderr = batch.communicate(timeout=300)
    finally:
        batch.kill()
    load.wait_replaced(service.management_url, pid, len(pids), timeout=300)
    with open(access_log, "rb") as log:
        log.seek(log_start)
        statuses = [line.split(b'"')[2].split()[0].decode() for line in log if b"POST /predict" in line]
    assert batch.returncode == 0, stderr
    assert [json.loads(line)["success"] for line in stdout.splitlines()] == [True] * 3
    # The killed worker's request failed once and was retried: the batch survived a real failure.
    assert len(statuses) == 4 and sorted(statuses)[-1] in ("503", "507"), statuses
