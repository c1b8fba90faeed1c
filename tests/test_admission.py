"""The explanation ledger: admission against the deadline, measured durations, dead workers, expiry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skinlesion.admission import FIRST_GUESS_SECONDS, RECENT_DURATIONS, Ledger, explanation_kind
from tests.conftest import ROOT


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=10.0)
    ledger.register_worker(deadline=10.0, pid=1)
    ledger.register_worker(deadline=10.0, pool="other version", pid=os.getppid())  # init: always alive, so two workers
    return ledger


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


def lesion_body(fullres_images) -> dict:
    import base64

    return {"image": base64.b64encode(fullres_images[0].read_bytes()).decode(), "explain": True, "precision": "Low"}


def test_the_ledger_learns_the_whole_request_not_only_the_explanation(predictor, fullres_images, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import skinlesion.service
    from skinlesion.service import Arrival, respond

    monkeypatch.setattr(skinlesion.service, "explanation_payload", lambda *a, **k: {})
    predict = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda *a, **k: time.sleep(0.3) or predict(*a, **k))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    [(status, _)] = respond(predictor, [lesion_body(fullres_images)], arrivals=[Arrival("r", time.time())],
                            ledger=ledger, deadline=60.0)
    assert status == 200
    with ledger.connect() as db:
        assert ledger.expected_seconds(db, "Low") >= 0.3  # the prediction before LIME counts


def test_the_admitting_server_refuses_at_once_with_the_wait(predictor, fullres_images, tmp_path: Path) -> None:
    from skinlesion.service import Arrival, respond

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=3.0, pool=predictor.arch)
    now = time.time()
    answers = respond(predictor, [lesion_body(fullres_images)] * 3, explanations_at="/explain",
                      arrivals=[Arrival(f"r{i}", now) for i in range(3)], ledger=ledger)
    # One worker, Low guessed at 2 s, 3 s deadline: the first fits, the next two would not.
    assert [status for status, _ in answers] == [307, 503, 503]
    assert answers[1][1]["retry_after"] >= 1 and "explanations are busy: 1 ahead" in answers[1][1]["error"]
    assert set(answers[1][1]) == {"success", "error", "retry_after"} and answers[1][1]["success"] is False


def test_an_explanation_picked_up_past_its_deadline_is_not_computed(predictor, fullres_images, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import skinlesion.service
    from skinlesion.service import Arrival, respond

    calls = []
    monkeypatch.setattr(skinlesion.service, "explanation_payload", lambda *a, **k: calls.append(1) or {})
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=5.0, pool=predictor.arch)
    with ledger.connect() as db:  # admitted 6 s ago by the batching server
        db.execute("INSERT INTO admitted VALUES (?, ?, ?)", ("old", "Low", time.time() - 6.0))
    [(status, answer)] = respond(predictor, [lesion_body(fullres_images)], arrivals=[Arrival("old", time.time())],
                                 ledger=ledger, deadline=5.0)
    # The admitting worker's arrival (6 s ago) counts, not the later one of the replay.
    assert status == 503 and "waited 6 s" in answer["error"] and calls == []
    assert admitted(ledger) == set()


def test_an_explanation_answered_with_an_error_before_it_starts_stops_counting(predictor, fullres_images, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from skinlesion.service import Arrival, respond

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=60.0, pool=predictor.arch)
    with ledger.connect() as db:  # both admitted by the batching server; each would count for 60 s
        for request_id in ("undecodable", "model failed", "still waiting"):
            db.execute("INSERT INTO admitted VALUES (?, ?, ?)", (request_id, "Low", time.time()))
    body = lesion_body(fullres_images)
    [(status, _)] = respond(predictor, [{**body, "image": base64.b64encode(b"not an image").decode()}],
                            arrivals=[Arrival("undecodable", time.time())], ledger=ledger, deadline=60.0)
    assert status == 400
    monkeypatch.setattr(predictor, "predict", lambda *a, **k: 1 / 0)
    [(status, _)] = respond(predictor, [body], arrivals=[Arrival("model failed", time.time())], ledger=ledger,
                            deadline=60.0)
    assert status == 500
    assert admitted(ledger) == {"still waiting"}


def test_an_explanation_the_rate_refuses_after_its_admission_stops_counting(predictor, fullres_images,
                                                                          tmp_path: Path) -> None:
    from skinlesion.service import RATE_REFUSED_REQUEST, Arrival, respond

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker(deadline=60.0, pool=predictor.arch)
    [(status, _)] = respond(predictor, [lesion_body(fullres_images)], explanations_at="/explain",
                            arrivals=[Arrival("over the rate", time.time())], ledger=ledger)
    assert status == 307 and admitted(ledger) == {"over the rate"}
    # nginx's rate then refuses the replay and sends the batching pool this body with the same request id.
    [(status, answer)] = respond(predictor, [RATE_REFUSED_REQUEST], explanations_at="/explain",
                                 arrivals=[Arrival("over the rate", time.time())], ledger=ledger)
    assert status == 429 and answer["success"] is False
    assert admitted(ledger) == set()


def test_nginx_releases_a_rate_refused_explanation_with_the_body_the_handler_knows() -> None:
    from skinlesion.service import RATE_REFUSED_REQUEST

    conf = (ROOT / "proxy" / "nginx.conf").read_text()
    location = re.search(r"location @explanation_rate_refused \{.*?proxy_set_body '([^']*)';", conf, re.S)
    assert json.loads(location[1]) == RATE_REFUSED_REQUEST
    assert re.search(r"location @explain \{[^}]*error_page 429 = @explanation_rate_refused;", conf)


def test_lime_stops_between_batches_at_the_deadline(predictor, fullres_images, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from skinlesion.service import Arrival, respond

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
