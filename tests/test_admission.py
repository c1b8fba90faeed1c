"""The explanation ledger: admission against the deadline, measured durations, dead workers, expiry."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.admission import (
    CLIENT_SHARE,
    FIRST_GUESS_SECONDS,
    LOCK_WAIT_SECONDS,
    RECENT_DURATIONS,
    Ledger,
    explanation_kind,
)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """Two workers of the default pool (this process and init, both alive) and one of another version's pool."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=10.0)
    ledger.register_worker(deadline=10.0, pid=1)
    other_version = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    ledger.register_worker(deadline=10.0, pool="other version", pid=other_version.pid)
    yield ledger
    other_version.kill()
    other_version.wait()


def admitted(ledger: Ledger) -> set[str]:
    with ledger.connect() as db:
        return {request_id for (request_id,) in db.execute("SELECT request_id FROM admitted")}


def finished_pid() -> int:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(gone.stdout)


def test_explanations_are_admitted_while_they_fit_the_deadline(ledger: Ledger) -> None:
    # Two workers, Low first guessed at 2 s, deadline 10 s: own 2 s + the queue's share, with the 25% margin,
    # must stay within 10 s; 9 would fit exactly, with nothing to spare.
    admitted = [ledger.admit(f"r{i}", "Low", arrival=100.0, now=100.0) is None for i in range(12)]
    assert admitted == [True] * 7 + [False] * 5
    refusal = ledger.admit("late", "Low", arrival=100.0, now=100.0)
    assert "7 ahead on 2 workers, about 9 s until this one would finish" in refusal.message
    assert "retry in" in refusal.message and refusal.retry_after >= 1
    # Grad-CAM is cheap enough to fit where LIME does not.
    assert ledger.admit("cheap", "gradcam", arrival=100.0, now=100.0) is None


def test_finished_explanations_free_their_place_and_teach_the_durations(ledger: Ledger) -> None:
    for i in range(7):
        assert ledger.admit(f"r{i}", "Low", 100.0, now=100.0) is None
    assert ledger.admit("next", "Low", 100.0, now=100.0) is not None
    ledger.finish("r0", "Low", seconds=0.5)
    ledger.finish("r1", "Low", seconds=None)  # refused past its deadline: not computed, not measured
    assert "r0" not in admitted(ledger) and ledger.start("r2") == 100.0 and ledger.start("unknown") is None
    with ledger.connect() as db:
        assert ledger.expected_seconds(db, "Low") == 0.5
        assert ledger.expected_seconds(db, "High") == FIRST_GUESS_SECONDS["High"]
    assert ledger.admit("next", "Low", 100.0, now=100.0) is None  # 5 ahead at 0.5 s now


def test_only_the_recent_durations_count(ledger: Ledger) -> None:
    for i in range(RECENT_DURATIONS + 5):
        ledger.finish(f"r{i}", "Medium", seconds=100.0 if i < 5 else 1.0)
    with ledger.connect() as db:
        assert db.execute("SELECT COUNT(*) FROM durations WHERE kind = 'Medium'").fetchone()[0] == RECENT_DURATIONS
        assert ledger.expected_seconds(db, "Medium") == 1.0


def test_entries_past_their_deadline_stop_counting(ledger: Ledger) -> None:
    for i in range(7):
        assert ledger.admit(f"r{i}", "Low", 100.0, now=100.0) is None
    assert ledger.admit("later", "Low", arrival=111.0, now=111.0) is None  # the seven are past 100 + 10 s
    assert admitted(ledger) == {"later"}


def test_an_explanation_whose_worker_died_stops_counting(ledger: Ledger) -> None:
    for i in range(7):
        assert ledger.admit(f"r{i}", "Low", 100.0, now=100.0) is None
    assert ledger.admit("next", "Low", 100.0, now=100.0) is not None
    dead = finished_pid()
    ledger.start("r0", pid=dead)
    ledger.start("r1", pid=dead)
    ledger.start("r2")  # this process: alive, still computing
    assert ledger.admit("next", "Low", 100.0, now=100.0) is None
    assert admitted(ledger) == {"r2", "r3", "r4", "r5", "r6", "next"}
    with ledger.connect() as db:
        assert db.execute("SELECT request_id FROM computing").fetchall() == [("r2",)]
    ledger.finish("r2", "Low", seconds=1.0)
    with ledger.connect() as db:
        assert db.execute("SELECT COUNT(*) FROM computing").fetchone()[0] == 0


def test_a_request_that_already_waited_is_refused_sooner(ledger: Ledger) -> None:
    assert ledger.admit("slow", "Low", arrival=100.0, now=109.0) is not None


def test_dead_workers_are_forgotten_and_without_workers_everything_is_admitted(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=1.0, pid=finished_pid())
    ledger.register_worker(deadline=1.0, pool="another version")
    assert all(ledger.admit(f"r{i}", "High", 100.0, now=100.0) is None for i in range(50))
    with ledger.connect() as db:
        assert ledger.workers(db) == (0, None)


def test_explanation_kind() -> None:
    assert explanation_kind("gradcam", "High") == "gradcam" and explanation_kind("lime", "Low") == "Low"
    assert explanation_kind("gradient", "Medium") == "gradient"


def lesion_body(fullres_images) -> dict:
    import base64

    return {"image": base64.b64encode(fullres_images[0].read_bytes()).decode(), "explain": True, "precision": "Low"}


def test_the_ledger_learns_the_whole_request_not_only_the_explanation(predictor, fullres_images, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.service
    from serving.service import Arrival, respond

    monkeypatch.setattr(serving.service, "explanation_payload", lambda *a, **k: {})
    predict = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda *a, **k: time.sleep(0.3) or predict(*a, **k))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    [(status, _)] = respond(predictor, [lesion_body(fullres_images)], arrivals=[Arrival("r", time.time())],
                            ledger=ledger, deadline=60.0)
    assert status == 200
    with ledger.connect() as db:
        assert ledger.expected_seconds(db, "Low") >= 0.3  # the prediction before LIME counts


def test_the_admitting_server_refuses_at_once_with_the_wait(predictor, fullres_images, tmp_path: Path) -> None:
    from serving.service import Arrival, respond

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=3.0, pool=predictor.arch)
    now = time.time()
    answers = respond(predictor, [lesion_body(fullres_images)] * 3, explanations_at="/explain",
                      arrivals=[Arrival(f"r{i}", now, admission=True) for i in range(3)], ledger=ledger)
    # One worker, Low guessed at 2 s, 3 s deadline: the first fits, the next two would not.
    assert [status for status, _ in answers] == [307, 503, 503]
    assert answers[1][1]["retry_after"] >= 1 and "explanations are busy: 1 ahead" in answers[1][1]["error"]
    assert set(answers[1][1]) == {"success", "error", "retry_after"} and answers[1][1]["success"] is False


def test_an_explanation_picked_up_past_its_deadline_is_not_computed(predictor, fullres_images, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.service
    from serving.service import Arrival, respond

    calls = []
    monkeypatch.setattr(serving.service, "explanation_payload", lambda *a, **k: calls.append(1) or {})
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=5.0, pool=predictor.arch)
    with ledger.connect() as db:  # admitted 6 s ago by the batching server
        db.execute("INSERT INTO admitted VALUES (?, ?, ?, '')", ("old", "Low", time.time() - 6.0))
    [(status, answer)] = respond(predictor, [lesion_body(fullres_images)], arrivals=[Arrival("old", time.time())],
                                 ledger=ledger, deadline=5.0)
    # The admitting worker's arrival (6 s ago) counts, not the later one of the replay.
    assert status == 503 and "waited 6 s" in answer["error"] and calls == []
    assert admitted(ledger) == set()


def test_an_explanation_answered_with_an_error_before_it_starts_stops_counting(predictor, fullres_images, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from serving.service import Arrival, respond

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=60.0, pool=predictor.arch)
    with ledger.connect() as db:  # both admitted by the batching server; each would count for 60 s
        for request_id in ("undecodable", "model failed", "still waiting"):
            db.execute("INSERT INTO admitted VALUES (?, ?, ?, '')", (request_id, "Low", time.time()))
    body = lesion_body(fullres_images)
    [(status, _)] = respond(predictor, [{**body, "image": base64.b64encode(b"not an image").decode()}],
                            arrivals=[Arrival("undecodable", time.time())], ledger=ledger, deadline=60.0)
    assert status == 400
    monkeypatch.setattr(predictor, "predict", lambda *a, **k: 1 / 0)
    [(status, _)] = respond(predictor, [body], arrivals=[Arrival("model failed", time.time())], ledger=ledger,
                            deadline=60.0)
    assert status == 500
    assert admitted(ledger) == {"still waiting"}


def test_lime_stops_between_batches_at_the_deadline(predictor, fullres_images, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.service import Arrival, respond

    ledger = Ledger(tmp_path / "ledger.sqlite")
    body = lesion_body(fullres_images)
    respond(predictor, [{"image": body["image"]}])  # warm: the prediction before LIME must not eat the time left
    arrived = time.time() - 1.0
    until = arrived + 5.0
    batches = []
    probabilities = predictor.probabilities

    def second_batch_runs_past_the_deadline(*args, **kwargs):
        batches.append(1)
        if len(batches) == 2:  # a slow batch, made deterministic: the clock passes the deadline during it
            time.sleep(max(0.0, until - time.time()) + 0.05)
        return probabilities(*args, **kwargs)

    monkeypatch.setattr(predictor, "probabilities", second_batch_runs_past_the_deadline)
    [(status, answer)] = respond(predictor, [{**body, "precision": "High"}],
                                 arrivals=[Arrival("r", arrived)], ledger=ledger, deadline=5.0)
    assert status == 503 and "did not finish within the 5 s" in answer["error"]
    # High asks for 1,500 samples, 24 batches of 64: the batch after the one that crossed the deadline never ran.
    assert len(batches) == 2
    with ledger.connect() as db:
        assert db.execute("SELECT COUNT(*) FROM durations").fetchone()[0] == 0  # stopped work is not a duration


def test_the_first_pass_of_an_explanation_is_sent_on_without_admission(predictor, fullres_images, tmp_path: Path) -> None:
    from serving.service import Arrival, respond

    # The pass before nginx's per-client explanation rate: admitting here would let a client over its rate hold
    # places it never uses.
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=3.0, pool=predictor.arch)
    answers = respond(predictor, [lesion_body(fullres_images)] * 3, explanations_at="/explain",
                      arrivals=[Arrival(f"r{i}", time.time(), "client") for i in range(3)], ledger=ledger)
    assert [status for status, _ in answers] == [307] * 3 and admitted(ledger) == set()


def test_one_client_takes_at_most_its_share_and_another_still_finds_room(ledger: Ledger) -> None:
    # Two workers, Low at 2 s, deadline 10 s: one client's queue may reach CLIENT_SHARE (5 s) with the margin.
    assert CLIENT_SHARE == 0.5
    # A client's first explanation is judged by the whole queue only, even one that alone needs more than the share.
    assert ledger.admit("c0", "Medium", 100.0, client="c", now=100.0) is None
    ledger.finish("c0")
    mine = [ledger.admit(f"a{i}", "Low", 100.0, client="a", now=100.0) is None for i in range(5)]
    assert mine == [True, True, True, False, False]
    refusal = ledger.admit("a9", "Low", 100.0, client="a", now=100.0)
    assert "3 of yours ahead" in refusal.message and refusal.retry_after >= 1
    assert ledger.admit("b0", "Low", 100.0, client="b", now=100.0) is None
    assert admitted(ledger) == {"a0", "a1", "a2", "b0"}  # refusals leave nothing behind


def test_arrivals_in_the_future_or_not_numbers_expire_like_any_other(ledger: Ledger) -> None:
    for request_id, arrival in (("nan", math.nan), ("inf", math.inf), ("1e12", 1e12)):
        assert ledger.admit(request_id, "Low", arrival, now=100.0) is None
    with ledger.connect() as db:
        assert {a for (a,) in db.execute("SELECT arrival FROM admitted")} == {100.0}
    # Past the deadline (10 s) they are gone.
    assert ledger.admit("honest", "Low", 111.0, now=111.0) is None
    assert admitted(ledger) == {"honest"}


def test_admissions_from_before_the_clock_stepped_back_stop_counting(ledger: Ledger) -> None:
    for i in range(7):
        assert ledger.admit(f"r{i}", "Low", 5000.0, now=5000.0) is None
    assert ledger.admit("after the step", "Low", 1400.0, now=1400.0) is None  # an hour earlier
    assert admitted(ledger) == {"after the step"}


def test_the_latest_durations_count_after_the_clock_steps_back(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(RECENT_DURATIONS):
        ledger.finish(f"old{i}", "Medium", seconds=100.0)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    for i in range(RECENT_DURATIONS):
        ledger.finish(f"new{i}", "Medium", seconds=1.0)
    with ledger.connect() as db:
        assert ledger.expected_seconds(db, "Medium") == 1.0


def test_durations_are_measured_on_a_monotonic_clock(predictor, fullres_images, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.service
    from serving.service import Arrival, respond

    real = time.time

    def clock_steps_back_an_hour(*args, **kwargs) -> dict:
        monkeypatch.setattr(time, "time", lambda: real() - 3600)
        return {}

    monkeypatch.setattr(serving.service, "explanation_payload", clock_steps_back_an_hour)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    [(status, _)] = respond(predictor, [lesion_body(fullres_images)], arrivals=[Arrival("r", real())],
                            ledger=ledger, deadline=60.0)
    assert status == 200
    with ledger.connect() as db:
        assert 0 < ledger.expected_seconds(db, "Low") < 60


def test_an_arrival_claimed_in_the_future_does_not_postpone_the_deadline(predictor, fullres_images, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.service
    from serving.service import Arrival, respond

    untils = []
    monkeypatch.setattr(serving.service, "explanation_payload", lambda *a, until=None, **k: untils.append(until) or {})
    for claimed in (1e12, math.inf, math.nan):
        before = time.time()
        [(status, _)] = respond(predictor, [lesion_body(fullres_images)], arrivals=[Arrival("r", claimed)],
                                ledger=Ledger(tmp_path / "ledger.sqlite"), deadline=60.0)
        assert status == 200 and before + 60.0 <= untils[-1] <= time.time() + 60.0


def test_a_worker_whose_pid_was_reused_is_not_counted(ledger: Ledger) -> None:
    with ledger.connect() as db:
        assert ledger.workers(db) == (2, 10.0)
        # The same pid, another process: the one that registered ended and a new one was given its pid.
        db.execute("UPDATE workers SET started = started - 1 WHERE pid = ?", (os.getpid(),))
        assert ledger.workers(db) == (1, 10.0)


def test_a_deleted_ledger_is_made_anew(ledger: Ledger) -> None:
    assert ledger.admit("before", "Low", 100.0, now=100.0) is None
    for suffix in ("", "-wal", "-shm"):
        Path(f"{ledger.path}{suffix}").unlink(missing_ok=True)
    assert ledger.admit("after", "Low", 100.0, now=100.0) is None
    assert ledger.start("after") is None  # no worker registered: admitted without a record
    ledger.finish("after", "Low", 1.0)
    ledger.register_worker(deadline=10.0)
    assert ledger.admit("counted", "Low", 100.0, now=100.0) is None and admitted(ledger) == {"counted"}


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"not a database, " * 1000)
    ledger = Ledger(path)
    ledger.register_worker(deadline=10.0)
    assert ledger.admit("r", "Low", 100.0, now=100.0) is None and admitted(ledger) == {"r"}
    [aside] = tmp_path.glob("ledger.sqlite.bad-*")
    assert aside.read_bytes().startswith(b"not a database") and "is unusable" in caplog.text


def test_an_unusable_ledger_admits_and_says_so(predictor, fullres_images, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from serving.service import Arrival, respond

    (tmp_path / "not a folder").write_text("")
    ledger = Ledger(tmp_path / "not a folder" / "ledger.sqlite")  # cannot be created, as in a read-only folder
    ledger.register_worker(deadline=10.0, pool=predictor.arch)  # what a worker's initialize does
    plain, explain = {"image": lesion_body(fullres_images)["image"]}, lesion_body(fullres_images)
    answers = respond(predictor, [plain, explain, plain], explanations_at="/explain",
                      arrivals=[Arrival(f"r{i}", time.time(), "c", admission=True) for i in range(3)], ledger=ledger)
    assert [status for status, _ in answers] == [200, 307, 200]
    [(status, _)] = respond(predictor, [{**explain, "method": "gradcam"}], arrivals=[Arrival("r1", time.time())],
                            ledger=ledger, deadline=60.0)
    assert status == 200
    assert "r1 admitted without it" in caplog.text and "not registered" in caplog.text


def test_a_held_lock_admits_within_the_lock_wait(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    holder = sqlite3.connect(ledger.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        assert ledger.admit("r", "Low", 100.0, now=100.0) is None
        ledger.finish("r", "Low", 1.0)
        assert time.monotonic() - started < 2 * LOCK_WAIT_SECONDS + 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "database is locked" in caplog.text and admitted(ledger) == set()


def test_a_new_file_locked_while_it_is_switched_to_wal_still_serves(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    with ledger.connect() as db:  # made, then back to a rollback journal: as a file another worker just created
        db.execute("PRAGMA journal_mode=DELETE")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM workers").fetchone()  # a read lock: WAL cannot be switched on now
    try:
        with caplog.at_level(logging.INFO), ledger.connect() as db:
            assert ledger.workers(db) == (0, None)
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    assert "not switched to WAL" in caplog.text
    with ledger.connect() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
