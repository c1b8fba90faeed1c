"""Load and worker-crash benchmark through the public door (nginx): every request must get an answer.

    .venv/bin/python bench/load.py --start [--requests 400] [--concurrency 16] [--explain-every 10]
    .venv/bin/python bench/load.py --url http://127.0.0.1:8089 --management-url http://127.0.0.1:8081 ...
    ... --kill-worker-after 50     SIGKILL a worker of the default version once 50 answers are in
    .venv/bin/python bench/load.py --start --overload 24 [--precision High] [--client-timeout 200]

--start runs its own service (serve.py's functions, free loopback ports, archives built from the weights
in --weights-dir) and stops it afterwards. A mix of plain predictions and LIME explanations at Low goes
to /predict from --concurrency threads, each on its own keep-alive connection, until --requests are
answered. The table
gives, per request kind: successes, failures by status, malformed answers (not a JSON envelope, or a
success without its fields), requests without an answer (timeouts, resets), p50/p99 latency. With
--kill-worker-after, it also gives how long TorchServe took to replace the worker.
Exit status 0 when every request was answered with a well-formed envelope, 1 otherwise.

--overload N sends N explanations of one photo at once, each from its own client address, with a plain
prediction every 0.5 s beside them, and waits until the explanation workers are done with all of them. It
prints the explanations answered (goodput per minute), refused (503), timed out (504 or no answer within
--client-timeout), and, with --start, the worker seconds spent on explanations nobody received (from the
workers' log: each computed or stopped explanation and its time, against the request ids clients got back).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import serve
from serving.settings import DEFAULT_MANAGEMENT_URL

ROOT = Path(__file__).resolve().parent.parent

DATA = Path(os.environ.get("SKIN_DATA_DIR", ROOT.parent / "shared" / "data")) / "ham10000-fullres"
CLASS_COUNT = 7


def client_address(i: int) -> str:
    """A loopback source address per simulated client: nginx limits requests per client address."""
    return f"127.0.{1 + i // 250}.{2 + i % 250}"


@dataclass(frozen=True)
class Outcome:
    kind: str  # "plain" or "explain"
    started: float  # time.monotonic() when sent
    seconds: float
    status: int | None  # None: no HTTP answer at all
    verdict: str  # "ok", "envelope", "malformed" or "no answer"
    detail: str  # the error message, or what was wrong


def judge(status: int, body: bytes, explain: bool) -> tuple[str, str]:
    """("ok" | "envelope" | "malformed", detail) for one HTTP answer from /predict."""
    try:
        payload = json.loads(body)
    except ValueError:
        return "malformed", f"not JSON: {body[:60]!r}"
    if not isinstance(payload, dict) or not isinstance(payload.get("success"), bool):
        return "malformed", f"no envelope: {json.dumps(payload)[:80]}"
    if payload["success"]:
        fields_ok = status == 200 and len(payload.get("probabilities", {})) == CLASS_COUNT and "prediction" in payload
        if explain:
            fields_ok = fields_ok and "image_png" in payload.get("explanation", {})
        return ("ok", "") if fields_ok else ("malformed", f"success without its fields: {sorted(payload)}")
    if status < 400 or not isinstance(payload.get("error"), str) or not payload["error"]:
        return "malformed", f"failure envelope with HTTP {status}: {json.dumps(payload)[:80]}"
    return "envelope", payload["error"]


def send(connection: http.client.HTTPConnection, body: bytes, explain: bool, timeout: float) -> Outcome:
    """POST one prebuilt body to /predict on a keep-alive connection (closed on any failure or when the
    server closes it, so that the next request reconnects)."""
    kind = "explain" if explain else "plain"
    started = time.monotonic()
    try:
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        content = response.read()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        return Outcome(kind, started, time.monotonic() - started, None, "no answer", type(exc).__name__)
    if response.will_close:
        connection.close()
    verdict, detail = judge(response.status, content, explain)
    return Outcome(kind, started, time.monotonic() - started, response.status, verdict, detail)


def run_load(url: str, images: list[bytes], total: int, concurrency: int = 16, explain_every: int = 10,
             timeouts: tuple[float, float] = (30.0, 120.0), on_answer: Callable[[int], None] | None = None) -> list[Outcome]:
    """Send `total` requests from `concurrency` threads; request i explains (LIME, Low) when
    explain_every > 0 and i % explain_every == explain_every - 1. on_answer(n) runs after the n-th answer.

    The bodies are built once and sent with http.client: the load generator shares the machine with the
    service, and a lighter client leaves more of it to what is measured.
    """
    target = urllib.parse.urlsplit(url)
    encoded = [base64.b64encode(image).decode() for image in images]
    plain = [json.dumps({"image": e}).encode() for e in encoded]
    explained = [json.dumps({"image": e, "explain": True, "precision": "Low"}).encode() for e in encoded]
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    next_index = iter(range(total))
    stop = threading.Event()

    def client(number: int) -> None:
        connection = http.client.HTTPConnection(target.hostname, target.port, source_address=(client_address(number), 0))
        try:
            while not stop.is_set():
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                explain = explain_every > 0 and i % explain_every == explain_every - 1
                body = (explained if explain else plain)[i % len(images)]
                outcome = send(connection, body, explain, timeouts[1] if explain else timeouts[0])
                with lock:
                    outcomes.append(outcome)
                    answered = len(outcomes)
                if on_answer:
                    on_answer(answered)
        finally:
            connection.close()

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(client, n) for n in range(concurrency)]
        try:
            for future in futures:
                future.result()
        except BaseException:  # Ctrl+C or SIGTERM: each client stops after the request it has in flight
            stop.set()
            raise
    return outcomes


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))] if ordered else float("nan")


def summarize(outcomes: list[Outcome]) -> dict[str, dict]:
    """Per kind (and "all"): requests, ok, failures by status, malformed, no answer, p50/p99/max seconds."""
    table = {}
    for kind in ("plain", "explain", "all"):
        rows = [o for o in outcomes if kind in ("all", o.kind)]
        if not rows:
            continue
        seconds = [o.seconds for o in rows]
        table[kind] = {
            "requests": len(rows),
            "ok": sum(o.verdict == "ok" for o in rows),
            "failures": dict(Counter(f"{o.status}" for o in rows if o.verdict == "envelope")),
            "malformed": sum(o.verdict == "malformed" for o in rows),
            "no answer": sum(o.verdict == "no answer" for o in rows),
            "p50 s": percentile(seconds, 50),
            "p99 s": percentile(seconds, 99),
            "max s": max(seconds),
        }
    return table


def print_summary(table: dict[str, dict], wall: float) -> None:
    columns = ["requests", "ok", "failures", "malformed", "no answer", "p50 s", "p99 s", "max s"]
    rows = [["kind", *columns]]
    for kind, row in table.items():
        failures = ", ".join(f"{n} x HTTP {status}" for status, n in sorted(row["failures"].items())) or "0"
        rows.append([kind, *(failures if c == "failures" else f"{row[c]:.2f}" if c.endswith(" s") else str(row[c])
                             for c in columns)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    total = table["all"]["requests"]
    print(f"{total} requests in {wall:.1f} s: {total / wall:.1f} requests/s")


def default_workers(management_url: str, model: str = "skin") -> tuple[str, list[int]]:
    """The default version of `model` and its worker pids, from the management API."""
    status, described = serve.http_json("GET", f"{management_url}/models/{model}")
    if status != 200:
        raise RuntimeError(f"cannot describe the model ({status}): {described}")
    return described[0]["modelVersion"], [int(w["pid"]) for w in described[0]["workers"]]


@dataclass(frozen=True)
class Kill:
    pid: int
    at: float  # time.monotonic() of the SIGKILL
    replaced: Future  # time.monotonic() once a new worker is READY in its place, watched from the kill on


def kill_worker(management_url: str, watcher: Executor) -> Kill:
    """SIGKILL the first worker of the default version and watch, on `watcher`, for its replacement."""
    _, pids = default_workers(management_url)
    os.kill(pids[0], signal.SIGKILL)
    at = time.monotonic()
    return Kill(pids[0], at, watcher.submit(wait_replaced, management_url, pids[0], len(pids)))


def wait_replaced(management_url: str, killed: int, expected_workers: int, timeout: float = 300,
                  model: str = "skin") -> float:
    """time.monotonic() once `model`'s default version has `expected_workers` READY workers again, none of them `killed`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, described = serve.http_json("GET", f"{management_url}/models/{model}")
        workers = described[0]["workers"] if status == 200 else []
        if (len(workers) == expected_workers and all(w["status"] == "READY" for w in workers)
                and killed not in {int(w["pid"]) for w in workers}):
            return time.monotonic()
        time.sleep(0.2)
    raise TimeoutError(f"worker {killed} was not replaced within {timeout:.0f} s")


def load_images(folder: Path, count: int) -> list[bytes]:
    paths = sorted(folder.glob("*.jpg"))[:count]
    if not paths:
        sys.exit(f"no .jpg images in {folder} (--images or SKIN_DATA_DIR)")
    return [p.read_bytes() for p in paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="the service's base URL (http://host:port), already running")
    target.add_argument("--start", action="store_true", help="start a service on free ports and stop it afterwards")
    parser.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL, help="TorchServe's management API (with --url)")
    parser.add_argument("--weights-dir", type=Path, default=ROOT / "model_store",
                        help="state dicts that --start builds its archives from")
    parser.add_argument("--explain-config", type=Path, default=None,
                        help="skin-explain's TorchServe settings for --start (default serving/explain-config.yaml)")
    parser.add_argument("--model", default="resnet34", help="default version for --start")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--explain-every", type=int, default=10, help="every N-th request explains (LIME, Low); 0: none")
    parser.add_argument("--images", type=Path, default=DATA, help="folder of .jpg photos to send")
    parser.add_argument("--kill-worker-after", type=int, metavar="N",
                        help="SIGKILL a worker of the default version after N answers")
    parser.add_argument("--overload", type=int, metavar="N", help="N explanations at once instead of the mixed load")
    parser.add_argument("--precision", default="High", help="the --overload explanations' precision")
    parser.add_argument("--client-timeout", type=float, default=200.0, help="seconds an --overload client waits")
    args = parser.parse_args(argv)
    images = load_images(args.images, 16)
    if not args.start:
        url, management = args.url.rstrip("/"), args.management_url.rstrip("/")
        return overload(url, images[0], args.overload, args.precision, args.client_timeout, None) if args.overload \
            else run(args, url, management, images)
    with started_service("skin-load-", args.model, args.weights_dir, args.explain_config) as (url, management, run_dir):
        if args.overload:
            return overload(url, images[0], args.overload, args.precision, args.client_timeout, run_dir / "torchserve")
        return run(args, url, management, images)


@contextmanager
def started_service(prefix: str, model: str, weights_dir: Path = ROOT / "model_store",
                    explain_config: Path | None = None) -> Iterator[tuple[str, str, Path]]:
    """A service of its own (archives from `weights_dir`, free loopback ports), stopped on leaving, also when its
    start fails halfway or a SIGTERM arrives; yields (public URL, management URL, run folder)."""
    # TorchServe daemonizes: a SIGTERM must still reach the `finally` that stops the service this starts.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        run_dir = Path(tmp)
        try:
            print("starting TorchServe and nginx ...", file=sys.stderr)
            serve.build_archives(run_dir / "model_store", weights_dir.resolve(), explain_config=explain_config)
            ports = serve.free_ports()
            url, management = serve.start_service(run_dir, run_dir / "model_store", ports,
                                                  f"127.0.0.1:{serve.free_port(tuple(ports.values()))}", model)
            yield url, management, run_dir
        finally:
            serve.stop_service(run_dir)


def overload(url: str, image: bytes, count: int, precision: str, client_timeout: float,
             log_dir: Path | None) -> int:
    """The overload scenario (--overload); returns the exit status."""
    target = urllib.parse.urlsplit(url)
    body = json.dumps({"image": base64.b64encode(image).decode(), "explain": True, "precision": precision}).encode()
    plain_body = json.dumps({"image": base64.b64encode(image).decode()}).encode()
    done = threading.Event()
    plain: list[Outcome] = []

    def explain(number: int) -> tuple[Outcome, str]:
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=client_timeout,
                                                source_address=(client_address(number), 0))
        started = time.monotonic()
        try:
            connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return Outcome("explain", started, time.monotonic() - started, None, "no answer", type(exc).__name__), ""
        finally:
            connection.close()
        verdict, detail = judge(response.status, content, True)
        outcome = Outcome("explain", started, time.monotonic() - started, response.status, verdict, detail)
        return outcome, response.getheader("X-Request-Id", "")

    def plain_client() -> None:
        connection = http.client.HTTPConnection(target.hostname, target.port, source_address=(client_address(count), 0))
        while not done.wait(0.5):
            plain.append(send(connection, plain_body, False, 30.0))
        connection.close()

    watcher = threading.Thread(target=plain_client)
    watcher.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(count) as pool:
            answers = list(pool.map(explain, range(count)))
    finally:
        done.set()
        watcher.join()
    wall = time.monotonic() - started
    outcomes = [o for o, _ in answers]
    received = {request_id for o, request_id in answers if o.status == 200}
    answered = sum(o.status == 200 for o in outcomes)
    refused = sum(o.status == 503 for o in outcomes)
    timed_out = sum(o.status in (None, 504) for o in outcomes)
    print(f"overload: {count} {precision} explanations at once, client timeout {client_timeout:g} s, "
          f"a plain prediction every 0.5 s")
    print(f"explanations: {answered} answered ({answered / wall * 60:.1f} per minute over {wall:.0f} s), {refused} refused "
          f"(503), {timed_out} timed out, {count - answered - refused - timed_out} other "
          f"({', '.join(sorted({str(o.status) for o in outcomes}))})")
    for label, rows in (("answered", [o for o in outcomes if o.status == 200]),
                        ("refused", [o for o in outcomes if o.status == 503])):
        if rows:
            seconds = [o.seconds for o in rows]
            print(f"  {label}: p50 {percentile(seconds, 50):.1f} s, max {max(seconds):.1f} s")
    if plain:
        seconds = [o.seconds for o in plain]
        ok = sum(o.verdict == "ok" for o in plain)
        print(f"plain predictions: {len(plain)}, {ok} ok, p50 {percentile(seconds, 50):.2f} s, max {max(seconds):.2f} s")
    if log_dir is not None:
        reached = count - refused - sum(o.status == 429 for o in outcomes)
        work = explanation_work(log_dir, reached)
        spent = sum(work.values())
        wasted = {rid: s for rid, s in work.items() if rid not in received}
        print(f"worker seconds on explanations: {spent:.0f} s on {len(work)}; nobody received {len(wasted)} of them: "
              f"{sum(wasted.values()):.0f} s")
    malformed = sum(o.verdict == "malformed" for o in outcomes + plain)
    return 0 if malformed == 0 else 1


def explanation_work(log_dir: Path, reached: int, timeout: float = 900.0) -> dict[str, float]:
    """Request id -> worker seconds spent on it, from the workers' log, once `reached` explanations are done."""
    pattern = re.compile(r"(?:explained|explanation) ([0-9a-f]{32}) \(\w+\) "
                         r"(?:in|stopped at its deadline after|not computed: it waited) ([\d.]+) s")
    deadline = time.monotonic() + timeout
    while True:
        text = "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("model_log.log*")))
        done = {}
        for line in text.splitlines():
            match = pattern.search(line)
            if match:
                done[match[1]] = 0.0 if "not computed" in line else float(match[2])
        if len(done) >= reached or time.monotonic() > deadline:
            return done
        time.sleep(2)


def run(args: argparse.Namespace, url: str, management: str, images: list[bytes]) -> int:
    version, pids = default_workers(management)
    killed: list[Kill] = []

    def maybe_kill(answered: int) -> None:
        if args.kill_worker_after and answered == args.kill_worker_after:
            killed.append(kill_worker(management, watcher))

    with ThreadPoolExecutor(1) as watcher:
        started = time.monotonic()
        outcomes = run_load(url, images, args.requests, args.concurrency, args.explain_every, on_answer=maybe_kill)
        wall = time.monotonic() - started
        replaced = killed[0].replaced.result() - killed[0].at if killed else None
    table = summarize(outcomes)
    print(f"default version {version}, {len(pids)} workers; {args.concurrency} clients; "
          f"every {args.explain_every or 'no'}-th request explains (LIME, Low)")
    print_summary(table, wall)
    for message, n in Counter(f"{o.verdict}: {o.detail}" for o in outcomes if o.verdict != "ok").most_common():
        print(f"  {n} x {message}")
    if killed:
        kill = killed[0]
        after = sorted((o for o in outcomes if o.started + o.seconds > kill.at), key=lambda o: o.started + o.seconds)
        failed = [o for o in after if o.verdict != "ok"]
        first_ok = next((o.started + o.seconds - kill.at for o in after if o.verdict == "ok"), float("nan"))
        print(f"killed worker {kill.pid} after {args.kill_worker_after} answers: {len(failed)} of the {len(after)} answers "
              f"after the kill failed; first success {first_ok:.2f} s after it; worker replaced (READY) after {replaced:.1f} s")
    return 0 if table["all"]["malformed"] == 0 and table["all"]["no answer"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
