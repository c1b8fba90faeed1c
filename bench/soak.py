"""Bounded soak: mixed predictions, explanations and bad inputs through nginx, every worker's memory sampled.

    .venv/bin/python bench/soak.py [--minutes 10] [--warmup-minutes 2] [--concurrency 4] [--sample-seconds 10]

Starts its own service (free loopback ports, archives from model_store/) and stops it after --minutes.
Each client loops over: plain predictions of full-size photos; every 8th request an explanation (Grad-CAM
and LIME Low in turn); every 5th a bad input (not JSON, not base64, not an image, a truncated JPEG). Every
--sample-seconds the resident memory of every TorchServe worker is read from /proc. The table gives answers
by kind and verdict (ok, envelope: a well-formed failure, malformed, no answer), then per worker its memory
at the end of the warm-up, its peak after it and at the end, and the growth. Exit status 1 when an answer
was lost or malformed, or a worker grew more than 5% after the warm-up.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import itertools
import json
import sys
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

from bench.budget import worker_pids
from bench.load import DATA, client_address, load_images, send, started_service

GROWTH_LIMIT = 0.05


def bodies(images: list[bytes]) -> list[tuple[str, bytes, bool]]:
    """(kind, body, explain) in the order the clients cycle through them."""
    encoded = [base64.b64encode(image).decode() for image in images]
    bad = [b"{not json", json.dumps({"image": "%%%"}).encode(),
           json.dumps({"image": base64.b64encode(b"plain text").decode()}).encode(),
           json.dumps({"image": base64.b64encode(images[0][: len(images[0]) // 3]).decode()}).encode()]
    methods = itertools.cycle([{"method": "gradcam"}, {"method": "lime", "precision": "Low"}])
    cycle = []
    for i in range(40):
        if i % 5 == 4:
            cycle.append(("bad input", bad[(i // 5) % len(bad)], False))
        elif i % 8 == 7:
            cycle.append(("explain", json.dumps({"image": encoded[i % len(encoded)], "explain": True,
                                                 **next(methods)}).encode(), True))
        else:
            cycle.append(("plain", json.dumps({"image": encoded[i % len(encoded)]}).encode(), False))
    return cycle


def resident_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def soak(url: str, management: str, minutes: float, warmup_minutes: float, concurrency: int,
         sample_seconds: float) -> int:
    cycle = bodies(load_images(DATA, 16))
    target = urllib.parse.urlsplit(url)
    verdicts: Counter[tuple[str, str]] = Counter()
    problems: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()
    end = started + minutes * 60
    stop = threading.Event()

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection(target.hostname, target.port, source_address=(client_address(offset), 0))
        for kind, body, explain in itertools.islice(itertools.cycle(cycle), offset, None):
            if stop.is_set() or time.monotonic() > end:
                break
            outcome = send(connection, body, explain, 240.0 if explain else 60.0)
            verdict = outcome.verdict
            if kind == "bad input" and verdict == "envelope" and outcome.status != 400:
                verdict = "malformed"
            with lock:
                verdicts[(kind, verdict)] += 1
                if verdict in ("malformed", "no answer"):
                    problems.append(f"{kind}: {outcome.status} {outcome.detail}")
        connection.close()

    threads = [threading.Thread(target=client, args=(i * 7,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    samples: dict[int, list[tuple[float, int]]] = {}
    try:
        while time.monotonic() < end:
            now = time.monotonic() - started
            for pid in worker_pids(management):
                rss = resident_bytes(pid)
                if rss is not None:
                    samples.setdefault(pid, []).append((now, rss))
            time.sleep(sample_seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=300)

    print(f"{'kind':<10} {'verdict':<10} {'answers':>8}")
    for (kind, verdict), count in sorted(verdicts.items()):
        print(f"{kind:<10} {verdict:<10} {count:>8}")
    grown = 0
    print(f"\n{'worker pid':>10} {'after warm-up':>14} {'peak after':>11} {'at the end':>11} {'growth':>7}")
    for pid, series in sorted(samples.items()):
        after = [rss for t, rss in series if t >= warmup_minutes * 60]
        if len(after) < 2:
            print(f"{pid:>10} (replaced or started after the warm-up: {len(series)} samples)")
            continue
        growth = after[-1] / after[0] - 1
        grown += growth > GROWTH_LIMIT
        print(f"{pid:>10} {after[0] / 2**20:>11.0f} MB {max(after) / 2**20:>8.0f} MB {after[-1] / 2**20:>8.0f} MB "
              f"{growth:>+6.1%}")
    for problem in problems[:10]:
        print(f"problem: {problem}")
    answers = sum(verdicts.values())
    print(f"\n{answers} answers in {minutes:g} min; lost or malformed: {len(problems)}; workers grown over "
          f"{GROWTH_LIMIT:.0%} after the warm-up: {grown}")
    return 1 if problems or grown else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--model", default="resnet34", help="default version")
    args = parser.parse_args(argv)
    with started_service("skin-soak-", args.model) as (url, management, _):
        return soak(url, management, args.minutes, args.warmup_minutes, args.concurrency, args.sample_seconds)


if __name__ == "__main__":
    sys.exit(main())
