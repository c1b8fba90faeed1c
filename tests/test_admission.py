"""The explanation ledger: admission against the deadline, measured durations, dead workers, expiry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from skinlesion.admission import FIRST_GUESS_SECONDS, RECENT_DURATIONS, Ledger, explanation_kind


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=10.0)
    ledger.register_worker(deadline=10.0, pid=1)  # init: always alive, so two workers
    return ledger


def test_explanations_are_admitted_while_they_fit_the_deadline(ledger: Ledger) -> None:
    # Two workers, Low first guessed at 2 s, deadline 10 s: own 2 s + the queue's share must stay within 10 s.
    admitted = [ledger.admit(f"r{i}", "Low", arrival=100.0, now=100.0) is None for i in range(12)]
    assert admitted == [True] * 9 + [False] * 3
    refusal = ledger.admit("late", "Low", arrival=100.0, now=100.0)
    assert "9 ahead" in refusal.message and "retry in" in refusal.message and refusal.retry_after >= 1
    # Grad-CAM is cheap enough to fit where LIME does not.
    assert ledger.admit("cheap", "gradcam", arrival=100.0, now=100.0) is None


def test_finished_explanations_free_their_place_and_teach_the_durations(ledger: Ledger) -> None:
    for i in range(9):
        assert ledger.admit(f"r{i}", "Low", 100.0, 100.0) is None
    assert ledger.admit("next", "Low", 100.0, 100.0) is not None
    ledger.finish("r0", "Low", seconds=0.5)
    ledger.finish("r1", "Low", seconds=None)  # refused past its deadline: not computed, not measured
    assert ledger.arrival("r0") is None and ledger.arrival("r2") == 100.0
    with ledger.connect() as db:
        assert ledger.expected_seconds(db, "Low") == 0.5
        assert ledger.expected_seconds(db, "High") == FIRST_GUESS_SECONDS["High"]
    assert ledger.admit("next", "Low", 100.0, 100.0) is None  # 7 ahead at 0.5 s now


def test_only_the_recent_durations_count(ledger: Ledger) -> None:
    for i in range(RECENT_DURATIONS + 5):
        ledger.finish(f"r{i}", "Medium", seconds=100.0 if i < 5 else 1.0)
    with ledger.connect() as db:
        assert db.execute("SELECT COUNT(*) FROM durations WHERE kind = 'Medium'").fetchone()[0] == RECENT_DURATIONS
        assert ledger.expected_seconds(db, "Medium") == 1.0


def test_entries_past_their_deadline_stop_counting(ledger: Ledger) -> None:
    for i in range(9):
        assert ledger.admit(f"r{i}", "Low", 100.0, 100.0) is None
    assert ledger.admit("later", "Low", arrival=111.0, now=111.0) is None  # the nine are past 100 + 10 s
    assert ledger.arrival("r0") is None


def test_a_request_that_already_waited_is_refused_sooner(ledger: Ledger) -> None:
    assert ledger.admit("slow", "Low", arrival=100.0, now=109.0) is not None


def test_dead_workers_are_forgotten_and_without_workers_everything_is_admitted(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ledger.register_worker(deadline=1.0, pid=int(gone.stdout))
    assert all(ledger.admit(f"r{i}", "High", 100.0, 100.0) is None for i in range(50))
    with ledger.connect() as db:
        assert ledger.workers(db) == (0, None)


def test_explanation_kind() -> None:
    assert explanation_kind("gradcam", "High") == "gradcam" and explanation_kind("lime", "Low") == "Low"
