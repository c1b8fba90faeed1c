"""Every case of bench/budget.py through the real nginx and TorchServe: answered, and no worker's resident
memory above the budget while it serves it (the bench also prints each case's time against a photo's)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from bench.budget import KINDS, MEMORY_LIMIT_BYTES, cases, peak_bytes, post, reset_peaks, worker_pids
from tests.conftest import FULLRES

CASES = cases(sorted(FULLRES.glob("*.jpg"))[0].read_bytes())


@pytest.mark.parametrize(("name", "image", "kind"), CASES, ids=[f"{name}, {kind}" for name, _, kind in CASES])
def test_each_budget_case_is_answered_within_the_memory_budget(service, name: str, image: bytes, kind: str) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs /proc/PID/clear_refs to reset the peak resident memory")
    pids = worker_pids(service.management_url)
    reset_peaks(pids)
    body = json.dumps({"image": base64.b64encode(image).decode(), **KINDS[kind]}).encode()
    # Its own client address: nginx limits explanations per address, and other tests explain from 127.0.0.1.
    assert post(service.url, body, "127.0.1.1") == (400 if "refused" in name else 200)
    assert peak_bytes(pids) <= MEMORY_LIMIT_BYTES
