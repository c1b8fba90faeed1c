"""Admission control and deadlines for explanations, shared by the server's worker processes.

An explanation is admitted only when it can finish by its deadline: the seconds the explanations already
admitted will take (each kind's recent median, measured as they finish), spread over the explanation
workers, plus its own, must fit with a margin for the spread of durations. Otherwise it is refused at once
with the expected wait. A worker that picks up an explanation past its deadline answers without computing
it, and LIME stops between sample batches once the deadline passes, so no worker spends minutes on a request
whose client has gone.

The ledger is one SQLite file that every worker of one server instance opens (in its temp folder): the
workers that explain register there with their deadline, the worker that admits records each admitted
explanation and its client, and the explaining workers record which of them computes it, each finish and how
long it took. An explanation whose worker died stops counting at the next admission.

The ledger is optional: plain predictions never touch it, and an explanation whose ledger cannot be used (the
file deleted, corrupt, locked, its folder not writable) is admitted without it, with a log line; the deadline
still bounds its work where it is computed. A file that is not a database is moved aside and made anew.
"""

from __future__ import annotations

import logging
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

from serving.settings import EXPECTED_SECONDS as FIRST_GUESS_SECONDS

log = logging.getLogger(__name__)

# Durations kept per kind for the median.
RECENT_DURATIONS = 20
# The work ahead is counted this much larger: one kind's durations spread by about this around their median
# here (Low at full resolution: 1.2 to 2.3 s), and an explanation admitted with no room to spare would be
# computed, then refused at its deadline.
ADMISSION_MARGIN = 1.25
# One client's explanations may take at most this share of the deadline's worker time: whoever comes next finds
# the other half free, however fast one client sends within its rate. A client's first explanation is judged by
# the whole queue only, so one that alone needs more than the share (High on a slow CPU) is still served.
CLIENT_SHARE = 0.5
# Writes take milliseconds: a lock held longer is a stuck or foreign holder, and the batch of plain predictions
# whose admission waits on it would wait too.
LOCK_WAIT_SECONDS = 1.0
# The name changes with the tables' columns, so that a file an older server left is never read as this layout.
LEDGER_NAME = "skin-explanations-v2.sqlite"
TABLES = {
    "workers": "pid INTEGER PRIMARY KEY, started INTEGER, pool TEXT, deadline REAL",
    "admitted": "request_id TEXT PRIMARY KEY, kind TEXT, arrival REAL, client TEXT",
    "durations": "kind TEXT, seconds REAL",
    "computing": "request_id TEXT PRIMARY KEY, pid INTEGER, started INTEGER",
}
# What SQLite says of a file that is not (or no longer) a database: such a file is moved aside.
BAD_FILE_ERRORS = ("SQLITE_NOTADB", "SQLITE_CORRUPT")


def explanation_kind(method: str, precision: str) -> str:
    """What an explanation costs depends on LIME's precision; Grad-CAM and the gradient method are one backward pass
    each at any precision."""
    return precision if method == "lime" else method


@dataclass(frozen=True)
class Refusal:
    """An explanation that cannot finish by its deadline: the answer's message and Retry-After seconds."""

    message: str
    retry_after: int


def clamp_arrival(arrival: float, now: float) -> float:
    """The arrival a header claims, no later than now: one in the future (or "inf", or "nan", which compares as
    neither old nor new) would never reach its deadline. One earlier than the deadline allows is refused as such."""
    return min(arrival, now) if math.isfinite(arrival) else now


def process_started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/<pid>/stat field 22), None where /proc does not
    say: with the pid it names one process, where a pid alone is reused after a restart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count the fields after its closing one.
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid: int, started: int | None = None) -> bool:
    """Whether process `pid` runs and is the one that started at `started` (None: any)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return started is None or process_started(pid) in (None, started)


def default_ledger_path() -> Path:
    # TorchServe's instance sets TMPDIR (serve.py), so each server instance on a host has its own ledger.
    return Path(tempfile.gettempdir()) / LEDGER_NAME


def prepare(db: sqlite3.Connection) -> None:
    """The tables, made on every connection: a deleted file comes back whole at the next request."""
    try:
        db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as exc:
        # Workers starting at once race to switch a new file to WAL and one can find it locked; the rollback
        # journal works meanwhile, and the next connection switches it.
        log.info("explanation ledger not switched to WAL this time: %s", exc)
    for name, columns in TABLES.items():
        db.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")


class Ledger:
    def __init__(self, path: str | Path | None = None) -> None:
        # Nothing is opened here: a worker whose ledger cannot be used still starts and serves.
        self.path = Path(path) if path else default_ledger_path()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        db = self.open()
        try:
            yield db
        finally:
            db.close()

    def open(self) -> sqlite3.Connection:
        """An autocommit connection with the tables in place; a file that is not a database is moved aside (with
        its journal) and a new one made."""
        db = sqlite3.connect(self.path, timeout=LOCK_WAIT_SECONDS, isolation_level=None)
        try:
            prepare(db)
            return db
        except sqlite3.DatabaseError as exc:
            db.close()
            if exc.sqlite_errorname not in BAD_FILE_ERRORS:
                raise
            aside = self.path.with_name(f"{self.path.name}.bad-{time.time():.0f}")
            log.error("explanation ledger %s is unusable (%s): moved to %s, starting a new one", self.path, exc, aside)
            os.replace(self.path, aside)
            for journal in ("-wal", "-shm"):
                self.path.with_name(self.path.name + journal).unlink(missing_ok=True)
        db = sqlite3.connect(self.path, timeout=LOCK_WAIT_SECONDS, isolation_level=None)
        prepare(db)
        return db

    def register_worker(self, deadline: float, pool: str = "", pid: int | None = None) -> None:
        """An explaining worker of `pool` (the model version it serves), and the seconds it allows an
        explanation from arrival to answer."""
        pid = pid or os.getpid()
        try:
            with self.connect() as db:
                db.execute("INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?)",
                           (pid, process_started(pid), pool, deadline))
        except (sqlite3.Error, OSError) as exc:
            log.warning("explanation ledger %s unusable (%s): worker %d not registered, explanations are admitted "
                        "without counting it", self.path, exc, pid)

    def workers(self, db: sqlite3.Connection, pool: str = "") -> tuple[int, float | None]:
        """(explaining workers of `pool` alive, their deadline); workers whose process has gone are forgotten."""
        deadlines = []
        rows = db.execute("SELECT pid, started, deadline FROM workers WHERE pool = ?", (pool,)).fetchall()
        for pid, started, deadline in rows:
            if alive(pid, started):
                deadlines.append(deadline)
            else:
                db.execute("DELETE FROM workers WHERE pid = ?", (pid,))
        return len(deadlines), (min(deadlines) if deadlines else None)

    def expected_seconds(self, db: sqlite3.Connection, kind: str) -> float:
        # The latest by rowid, which only grows: a wall clock stepped back would bury new durations under old ones.
        rows = db.execute("SELECT seconds FROM durations WHERE kind = ? ORDER BY rowid DESC LIMIT ?",
                          (kind, RECENT_DURATIONS)).fetchall()
        return statistics.median(r[0] for r in rows) if rows else FIRST_GUESS_SECONDS.get(kind, FIRST_GUESS_SECONDS["High"])

    def admit(self, request_id: str, kind: str, arrival: float, *, client: str = "", pool: str = "",
              now: float | None = None) -> Refusal | None:
        """Record the explanation of `client` for the workers of `pool` and return None, or return why it cannot
        finish by its deadline or would take more than the client's share. Admitted, with a log line, when the
        ledger cannot be used."""
        try:
            with self.connect() as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    refusal = self.judge(db, request_id, kind, arrival, client, pool, now)
                    db.execute("COMMIT")
                    return refusal
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except (sqlite3.Error, OSError) as exc:
            log.warning("explanation ledger %s unusable (%s): %s admitted without it", self.path, exc, request_id or "-")
            return None

    def judge(self, db: sqlite3.Connection, request_id: str, kind: str, arrival: float, client: str, pool: str,
              now: float | None) -> Refusal | None:
        # Read once the lock is held: an earlier clock than another admitting worker's would take its fresh rows
        # for ones from the future.
        now = time.time() if now is None else now
        count, deadline = self.workers(db, pool)
        if not count:  # no explaining worker has registered (yet): nothing to measure against
            return None
        arrival = clamp_arrival(arrival, now)
        # Explanations past their deadline are answered at once without computing, and those whose worker died are
        # answered with its failure: they cost nothing more. Rows from the future were written before the clock
        # stepped back.
        db.execute("DELETE FROM admitted WHERE arrival < ? OR arrival > ?", (now - deadline, now))
        for computed, pid, started in db.execute("SELECT request_id, pid, started FROM computing").fetchall():
            if not alive(pid, started):
                db.execute("DELETE FROM admitted WHERE request_id = ?", (computed,))
        db.execute("DELETE FROM computing WHERE request_id NOT IN (SELECT request_id FROM admitted)")
        ahead = db.execute("SELECT kind, client FROM admitted").fetchall()
        wait = sum(self.expected_seconds(db, k) for k, _ in ahead) / count
        own = self.expected_seconds(db, kind)
        if (now - arrival) + ADMISSION_MARGIN * (wait + own) > deadline:
            retry = max(1, math.ceil(ADMISSION_MARGIN * (wait + own) - deadline))
            return Refusal(
                f"explanations are busy: {len(ahead)} ahead on {count} workers, about {math.ceil(wait + own)} s "
                f"until this one would finish, too close to the {deadline:g} s an explanation may take; retry in "
                f"{retry} s, or use method gradient", retry)
        mine = [k for k, c in ahead if client and c == client]
        held = sum(self.expected_seconds(db, k) for k in mine) / count
        if mine and ADMISSION_MARGIN * (held + own) > CLIENT_SHARE * deadline:
            retry = max(1, math.ceil(ADMISSION_MARGIN * (held + own) - CLIENT_SHARE * deadline))
            return Refusal(
                f"explanations are busy: {len(mine)} of yours ahead, and one client may take at most "
                f"{CLIENT_SHARE:.0%} of the explanation workers' time; retry in {retry} s, when one of yours is "
                "done", retry)
        db.execute("INSERT OR REPLACE INTO admitted VALUES (?, ?, ?, ?)", (request_id, kind, arrival, client))
        return None

    def start(self, request_id: str, pid: int | None = None) -> float | None:
        """This worker (or `pid`) picks the explanation up: when the admitting worker recorded its arrival, None if
        it was not admitted here or the ledger cannot be used."""
        pid = pid or os.getpid()
        try:
            with self.connect() as db:
                row = db.execute("SELECT arrival FROM admitted WHERE request_id = ?", (request_id,)).fetchone()
                if row:
                    db.execute("INSERT OR REPLACE INTO computing VALUES (?, ?, ?)",
                               (request_id, pid, process_started(pid)))
        except (sqlite3.Error, OSError) as exc:
            log.warning("explanation ledger %s unusable (%s): %s computed without it", self.path, exc, request_id)
            return None
        return row[0] if row else None

    def finish(self, request_id: str, kind: str = "", seconds: float | None = None) -> None:
        """The explanation is answered; `seconds` is what its worker spent on the request of that `kind`, decoding
        and the prediction included (None: it was not computed)."""
        try:
            with self.connect() as db:
                db.execute("DELETE FROM admitted WHERE request_id = ?", (request_id,))
                db.execute("DELETE FROM computing WHERE request_id = ?", (request_id,))
                if seconds is not None:
                    db.execute("INSERT INTO durations VALUES (?, ?)", (kind, seconds))
                    db.execute("DELETE FROM durations WHERE kind = ? AND rowid NOT IN (SELECT rowid FROM durations "
                               "WHERE kind = ? ORDER BY rowid DESC LIMIT ?)", (kind, kind, RECENT_DURATIONS))
        except (sqlite3.Error, OSError) as exc:
            log.warning("explanation ledger %s unusable (%s): the finish of %s not recorded", self.path, exc, request_id)
