"""Admission control and deadlines for explanations, shared by the server's worker processes.

An explanation is admitted only when it can finish by its deadline: the seconds the explanations already
admitted will take (each kind's recent median, measured as they finish), spread over the explanation
workers, plus its own, must fit with a margin for the spread of durations. Otherwise it is refused at once
with the expected wait. A worker that picks up an explanation past its deadline answers without computing
it, and LIME stops between sample batches once the deadline passes, so no worker spends minutes on a request
whose client has gone.

The ledger is one SQLite file that every worker of one server instance opens (in its temp folder): the
workers that explain register there with their deadline, the worker that admits records each admitted
explanation, and the explaining workers record which of them computes it, each finish and how long it took.
An explanation whose worker died stops counting at the next admission.
"""

from __future__ import annotations

import math
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from skinlesion.options import EXPECTED_SECONDS as FIRST_GUESS_SECONDS

# Durations kept per kind for the median.
RECENT_DURATIONS = 20
# The work ahead is counted this much larger: one kind's durations spread by about this around their median
# here (Low at full resolution: 1.2 to 2.3 s), and an explanation admitted with no room to spare would be
# computed, then refused at its deadline.
ADMISSION_MARGIN = 1.25
LEDGER_NAME = "skin-explanations.sqlite"


def explanation_kind(method: str, precision: str) -> str:
    """What an explanation costs depends on LIME's precision; Grad-CAM is one backward pass at any precision."""
    return "gradcam" if method == "gradcam" else precision


@dataclass(frozen=True)
class Refusal:
    """An explanation that cannot finish by its deadline: the answer's message and Retry-After seconds."""

    message: str
    retry_after: int


class DeadlinePassed(Exception):
    """Raised inside an explanation once its deadline has passed; the work done so far is dropped."""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return True


def default_ledger_path() -> Path:
    # TorchServe's instance sets TMPDIR (serve.py), so each server instance on a host has its own ledger.
    return Path(tempfile.gettempdir()) / LEDGER_NAME


class Ledger:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_ledger_path()
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS workers (pid INTEGER PRIMARY KEY, pool TEXT, deadline REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS admitted (request_id TEXT PRIMARY KEY, kind TEXT, arrival REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS durations (kind TEXT, seconds REAL, finished REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS computing (request_id TEXT PRIMARY KEY, pid INTEGER)")

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        # Autocommit; a write waits up to 5 s for another worker's.
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def register_worker(self, deadline: float, pool: str = "", pid: int | None = None) -> None:
        """An explaining worker of `pool` (the model version it serves), and the seconds it allows an
        explanation from arrival to answer."""
        with self.connect() as db:
            db.execute("INSERT OR REPLACE INTO workers VALUES (?, ?, ?)", (pid or os.getpid(), pool, deadline))

    def workers(self, db: sqlite3.Connection, pool: str = "") -> tuple[int, float | None]:
        """(explaining workers of `pool` alive, their deadline); workers whose process has gone are forgotten."""
        deadlines = []
        for pid, deadline in db.execute("SELECT pid, deadline FROM workers WHERE pool = ?", (pool,)).fetchall():
            if alive(pid):
                deadlines.append(deadline)
            else:
                db.execute("DELETE FROM workers WHERE pid = ?", (pid,))
        return len(deadlines), (min(deadlines) if deadlines else None)

    def expected_seconds(self, db: sqlite3.Connection, kind: str) -> float:
        rows = db.execute("SELECT seconds FROM durations WHERE kind = ? ORDER BY finished DESC LIMIT ?",
                          (kind, RECENT_DURATIONS)).fetchall()
        return statistics.median(r[0] for r in rows) if rows else FIRST_GUESS_SECONDS.get(kind, FIRST_GUESS_SECONDS["High"])

    def admit(self, request_id: str, kind: str, arrival: float, *, pool: str = "", now: float | None = None) -> Refusal | None:
        """Record the explanation for the workers of `pool` and return None, or return why it cannot finish by
        its deadline."""
        now = time.time() if now is None else now
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                count, deadline = self.workers(db, pool)
                if not count:  # no explaining worker has registered (yet): nothing to measure against
                    db.execute("COMMIT")
                    return None
                # Explanations past their deadline are answered at once without computing, and those whose worker
                # died are answered with its failure: they cost nothing more.
                db.execute("DELETE FROM admitted WHERE arrival < ?", (now - deadline,))
                for computed, pid in db.execute("SELECT request_id, pid FROM computing").fetchall():
                    if not alive(pid):
                        db.execute("DELETE FROM admitted WHERE request_id = ?", (computed,))
                db.execute("DELETE FROM computing WHERE request_id NOT IN (SELECT request_id FROM admitted)")
                ahead = [k for (k,) in db.execute("SELECT kind FROM admitted").fetchall()]
                wait = sum(self.expected_seconds(db, k) for k in ahead) / count
                own = self.expected_seconds(db, kind)
                if (now - arrival) + ADMISSION_MARGIN * (wait + own) > deadline:
                    db.execute("COMMIT")
                    retry = max(1, math.ceil(ADMISSION_MARGIN * (wait + own) - deadline))
                    return Refusal(
                        f"explanations are busy: {len(ahead)} ahead on {count} workers, about {math.ceil(wait + own)} s "
                        f"until this one would finish, too close to the {deadline:g} s an explanation may take; retry in "
                        f"{retry} s, or use method gradcam", retry)
                db.execute("INSERT OR REPLACE INTO admitted VALUES (?, ?, ?)", (request_id, kind, arrival))
                db.execute("COMMIT")
                return None
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def start(self, request_id: str, pid: int | None = None) -> float | None:
        """This worker (or `pid`) picks the explanation up: when the admitting worker recorded its arrival, None if
        it was not admitted here."""
        with self.connect() as db:
            row = db.execute("SELECT arrival FROM admitted WHERE request_id = ?", (request_id,)).fetchone()
            if row:
                db.execute("INSERT OR REPLACE INTO computing VALUES (?, ?)", (request_id, pid or os.getpid()))
        return row[0] if row else None

    def finish(self, request_id: str, kind: str = "", seconds: float | None = None) -> None:
        """The explanation is answered; `seconds` is what its worker spent on the request of that `kind`, decoding
        and the prediction included (None: it was not computed)."""
        with self.connect() as db:
            db.execute("DELETE FROM admitted WHERE request_id = ?", (request_id,))
            db.execute("DELETE FROM computing WHERE request_id = ?", (request_id,))
            if seconds is not None:
                db.execute("INSERT INTO durations VALUES (?, ?, ?)", (kind, seconds, time.time()))
                db.execute("DELETE FROM durations WHERE kind = ? AND rowid NOT IN (SELECT rowid FROM durations "
                           "WHERE kind = ? ORDER BY finished DESC LIMIT ?)", (kind, kind, RECENT_DURATIONS))
