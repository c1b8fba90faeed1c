"""Serving benchmark: the model's own speed in-process (the floor) against the same model through nginx and
TorchServe, on real full-size photos, with the served time split into its parts.

    .venv/bin/python bench/latency.py [--requests 240] [--concurrency 1 4 8 16] [--models resnet18 resnet34]
                                    [--model-config serving/model-config.yaml] [--explain-load]

It builds archives of the shipped weights with the given per-version TorchServe settings of the plain-
prediction model "skin" (the levers: workers, batchSize, maxBatchDelay, torch_threads; explanations keep
serving/explain-config.yaml), starts TorchServe and nginx on free ports via serve.py, and stops them at the
end. Each model's levels follow a warm-up that lasts until TorchServe's JIT compilers are done. Timings are
wall-clock on this machine, and the CPU split counts every nginx and TorchServe process on it: run it on an
otherwise idle one. The floor's best batch is measured again after each model's served levels, and the ratios
use the mean of the two: on a shared host the floor moved by several percent within one run. On a host with
a GPU the floor runs on CUDA, as TorchServe's workers do there.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import requests
import torch

import serve
from bench.load import percentile, run_load
from serving.skin_handler import BATCHES_METRIC, REQUESTS_METRIC, TIMER_METRIC
from skinlesion.image import decode_image
from skinlesion.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent

BATCH_SIZES = (1, 4, 8, 16, 32)
LATENCY_METRIC = "ts_inference_latency_microseconds"
# The targets the serving work was asked to meet.
MIN_THROUGHPUT_RATIO = 0.7  # served at concurrency 8 / floor
MAX_ADDED_MS = 25.0  # served p50 at concurrency 1 minus the in-process single-image latency
MAX_ERROR_RATE = 0.01
MAX_EXPLAIN_SLOWDOWN = 3.0  # p99 of plain predictions while a High explanation runs / idle p99
WARM_UP_REQUESTS = 480  # per warm-up round, at concurrency 8
# TorchServe's JVM compiles its request path over its first requests (with C2, the JVM's default, for more than
# 7,000 of them, at up to 1.5 ms of CPU per request); the served levels start once a round's compiling is below this.
JIT_SETTLED_MS = 0.05
MAX_WARM_UP_ROUNDS = 16
# Where the served CPU time goes, by process: a marker in each kind's command line.
PROCESS_GROUPS = {"nginx": "nginx", "TorchServe": "org.pytorch.serve.ModelServer", "workers": "model_service_worker"}


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: the first call picks kernels and allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batch_throughput(predictor: Predictor, photos: list, size: int) -> float:
    """Images per second of preprocessing + forward in batches of `size`."""
    batch = [photos[i % len(photos)] for i in range(size)]
    return size / median_seconds(lambda: predictor.predict(batch), max(3, 64 // size))


def floor(predictor: Predictor, photos: list) -> dict:
    """In-process: preprocessing + forward at each batch size, and one image's latency."""
    per_batch = {size: batch_throughput(predictor, photos, size) for size in BATCH_SIZES}
    best = max(per_batch, key=per_batch.get)
    latency = median_seconds(lambda: predictor.predict(photos[:1]), 30)
    return {"throughput": per_batch[best], "best_batch": best, "latency_ms": latency * 1000, "per_batch": per_batch}


def reference(measured: dict) -> float:
    """What the ratios compare against: the floor's best batch before and after the served levels, averaged,
    since a shared host's speed drifts over the minutes between them (docs/performance.md)."""
    return (measured["throughput"] + measured["after"]) / 2


class Service:
    """The real stack on free ports: TorchServe with both versions behind nginx, archives built by archive.sh."""

    def __init__(self, workdir: Path, weights_dir: Path, model_config: Path) -> None:
        self.run_dir = workdir / "run"
        self.run_dir.mkdir()
        store = workdir / "model_store"
        serve.build_archives(store, weights_dir, model_config)
        self.ports = serve.free_ports()
        listen = f"127.0.0.1:{serve.free_port(tuple(self.ports.values()))}"
        try:
            self.url, self.management = serve.start_service(self.run_dir, store, self.ports, listen, "resnet34", timeout=300)
        except BaseException:  # whatever part did start (TorchServe daemonizes)
            self.stop()
            raise

    def stop(self) -> None:
        serve.stop_service(self.run_dir)

    def metrics(self) -> dict[str, float]:
        """TorchServe's Prometheus counters for model "skin", summed over its versions: its cumulative
        inference latency and the handler's own timers (skin_handler.record_timings)."""
        text = requests.get(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=10).text
        return skin_counters(text)


def skin_counters(text: str) -> dict[str, float]:
    """Counter name -> value summed over the series of model "skin" in a Prometheus text exposition."""
    totals: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(\w+)\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        if re.search(r'(?i)model_?name="skin"', labels):
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def handler_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean per-request milliseconds of each handler stage, and the mean batch size ("batch"), between two
    snapshots of the counters."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    served, batches = delta(REQUESTS_METRIC), delta(BATCHES_METRIC)
    stages = {"decode", "preprocess", "forward"}
    return {"batch": served / max(batches, 1)} | {
        stage: delta(TIMER_METRIC.format(stage=stage.capitalize())) / max(served, 1) for stage in sorted(stages)}


def used_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds of the process or thread whose /proc `stat` file this is."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes() -> Iterator[tuple[Path, str]]:
    """(/proc folder, command line) of every process on the machine."""
    for process in Path("/proc").iterdir():
        if process.name.isdigit():
            try:
                yield process, (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # ended meanwhile
                continue


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process (the load generator) and by all nginx,
    TorchServe frontend and TorchServe worker processes on the machine."""
    totals = dict.fromkeys(["client", *PROCESS_GROUPS], 0.0)
    for process, command in processes():
        own = int(process.name) == os.getpid()
        group = "client" if own else next((g for g, marker in PROCESS_GROUPS.items() if marker in command), None)
        if group:
            try:
                totals[group] += used_cpu_seconds(process / "stat")
            except OSError:  # ended meanwhile
                continue
    return totals


def jit_compiler_seconds() -> dict[int, float]:
    """CPU seconds so far of each JIT compiler thread of TorchServe's Java frontend, by thread id (the JVM starts
    and ends compiler threads as it needs them)."""
    seconds = {}
    for process, command in processes():
        if PROCESS_GROUPS["TorchServe"] not in command:
            continue
        for thread in (process / "task").iterdir():
            try:
                if "CompilerThre" in (thread / "comm").read_text():
                    seconds[int(thread.name)] = used_cpu_seconds(thread / "stat")
            except OSError:  # ended meanwhile
                continue
    return seconds


def warm_up(url: str, photos: list[bytes]) -> list[float]:
    """Rounds of plain predictions at concurrency 8 until the JVM's JIT compilers spent under JIT_SETTLED_MS of
    CPU per request in a round: the new default version's workers warm up too. Returns each round's compiler
    milliseconds per request."""
    rounds: list[float] = []
    while (not rounds or rounds[-1] >= JIT_SETTLED_MS) and len(rounds) < MAX_WARM_UP_ROUNDS:
        before = jit_compiler_seconds()
        run_load(url, photos, WARM_UP_REQUESTS, 8, explain_every=0)
        after = jit_compiler_seconds()
        if not after:  # else the rule would read "done compiling" on a JVM whose threads it cannot see
            raise RuntimeError("no JIT compiler thread of TorchServe's frontend found in /proc")
        rounds.append(sum(seconds - before.get(thread, 0.0) for thread, seconds in after.items()) * 1000 / WARM_UP_REQUESTS)
    return rounds


def load(url: str, photos: list[bytes], total: int, concurrency: int) -> dict:
    """`total` plain predictions from `concurrency` clients (bench/load.py's load generator), with the CPU
    milliseconds per request each kind of process spent meanwhile."""
    before = cpu_seconds()
    start = time.perf_counter()
    outcomes = run_load(url, photos, total, concurrency, explain_every=0)
    wall = time.perf_counter() - start
    cpu = {group: (seconds - before[group]) * 1000 / total for group, seconds in cpu_seconds().items()}
    ms = [o.seconds * 1000 for o in outcomes]
    errors = Counter(f"HTTP {o.status}" if o.status else o.verdict for o in outcomes if o.verdict != "ok")
    return {"throughput": total / wall, "p50": percentile(ms, 50), "p99": percentile(ms, 99), "errors": dict(errors),
            "answered": len(ms), "cpu_ms": cpu, "busy": sum(cpu.values()) * total / 1000 / (wall * os.cpu_count())}


def explain_load(url: str, photo: bytes, total: int) -> dict:
    """p99 of sequential plain predictions, idle and while High explanations run back to back."""
    idle = load(url, [photo], total, 1)
    explained = {"image": base64.b64encode(photo).decode(), "explain": True, "precision": "High"}
    stop = threading.Event()
    explanations: list[float] = []

    def explain_forever() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            requests.post(f"{url}/predict", json=explained, timeout=300)
            explanations.append(time.perf_counter() - start)

    background = threading.Thread(target=explain_forever)
    background.start()
    time.sleep(2)  # the explanation is on a worker before the plain requests start
    busy = load(url, [photo], total, 1)
    stop.set()
    background.join()
    return {"idle": idle, "busy": busy, "explanation_seconds": statistics.fmean(explanations) if explanations else None}


def encode_ms(answer: dict) -> float:
    """The JSON encoding of one answer, as TorchServe's Python backend does it after the handler."""
    return median_seconds(lambda: json.dumps(answer), 200) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000-fullres")
    parser.add_argument("--images", type=int, default=16, help="distinct photos sent round-robin")
    parser.add_argument("--requests", type=int, default=240, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet34"])
    parser.add_argument("--weights-dir", type=Path, default=ROOT / "model_store")
    parser.add_argument("--model-config", type=Path, default=ROOT / "serving" / "model-config.yaml",
                        help="per-version TorchServe settings packed into the archives (the lever under test)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the in-process floor")
    parser.add_argument("--explain-load", action="store_true",
                        help="also measure plain-prediction p99 while High explanations run (resnet34)")
    args = parser.parse_args()
    # TorchServe daemonizes: a SIGTERM must still reach the `finally` that stops the service this starts.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    paths = sorted(args.data.glob("*.jpg"))[: args.images]
    raw = [p.read_bytes() for p in paths]
    photos = [decode_image(r) for r in raw]
    print(f"{len(raw)} photos from {args.data} ({photos[0].width}x{photos[0].height}), "
          f"{args.requests} requests per level, config {args.model_config}, {os.cpu_count()} cores")
    settings = [line for line in args.model_config.read_text().splitlines() if line and not line.startswith("#")]
    print(f"model config: {' | '.join(settings)}")
    # TorchServe gives its workers the host's GPUs whenever it has any (skin_handler.worker_device): so does the floor.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}")

    predictors = {arch: Predictor.from_checkpoint(args.weights_dir / f"{arch}.pt", device) for arch in args.models}
    torch.set_num_threads(args.threads)
    floors = {arch: floor(predictor, photos) for arch, predictor in predictors.items()}
    torch.set_num_threads(1)  # the client side must not compete with the servers for the cores
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp), args.weights_dir, args.model_config)
        try:
            results, warm_ups = {}, {}
            for arch in args.models:
                serve.set_default(service.management, arch)
                warm_ups[arch] = warm_up(service.url, raw)
                for concurrency in args.concurrency:
                    before = service.metrics()
                    result = load(service.url, raw, args.requests, concurrency)
                    after = service.metrics()
                    latency = after.get(LATENCY_METRIC, 0.0) - before.get(LATENCY_METRIC, 0.0)
                    result["torchserve_ms"] = latency / 1000 / args.requests
                    result["handler"] = handler_ms(before, after)
                    results[arch, concurrency] = result
                torch.set_num_threads(args.threads)  # the floor's best batch again, the service idle meanwhile
                floors[arch]["after"] = batch_throughput(predictors[arch], photos, floors[arch]["best_batch"])
                torch.set_num_threads(1)
            answer = requests.post(f"{service.url}/predict", json={"image": base64.b64encode(raw[0]).decode()}, timeout=60).json()
            explain = None
            if args.explain_load:
                serve.set_default(service.management, "resnet34")
                explain = explain_load(service.url, raw[0], max(60, args.requests // 4))
        finally:
            service.stop()

    encode = encode_ms(answer)
    print(f"\nFloor (in-process on {device}, same preprocessing, torch threads = {args.threads})")
    print("| model | " + " | ".join(f"batch {b} img/s" for b in BATCH_SIZES)
          + " | best | best again after the served levels | reference (mean) | 1-image latency |")
    print("|---" * (len(BATCH_SIZES) + 5) + "|")
    for arch, f in floors.items():
        cells = " | ".join(f"{f['per_batch'][b]:.1f}" for b in BATCH_SIZES)
        print(f"| {arch} | {cells} | {f['throughput']:.1f} (batch {f['best_batch']}) | {f['after']:.1f} | "
              f"{reference(f):.1f} | {f['latency_ms']:.1f} ms |")

    print(f"\nWarm-up: rounds of {WARM_UP_REQUESTS} requests at concurrency 8 until TorchServe's JIT compilers spent "
          f"under {JIT_SETTLED_MS} ms of CPU per request in a round; their ms per request, round by round:")
    for arch, rounds in warm_ups.items():
        print(f"{arch}: {len(rounds) * WARM_UP_REQUESTS} requests: " + ", ".join(f"{ms:.2f}" for ms in rounds))

    print("\nServed (client -> nginx -> TorchServe -> handler), full-size JPEGs")
    print("| model | concurrency | img/s | x floor | p50 ms | p99 ms | errors | TorchServe ms | mean batch "
          "| decode | preprocess | forward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (arch, concurrency), r in results.items():
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        h = r["handler"]
        print(f"| {arch} | {concurrency} | {r['throughput']:.1f} | {r['throughput'] / reference(floors[arch]):.2f} | "
              f"{r['p50']:.1f} | {r['p99']:.1f} | {errors} | {r['torchserve_ms']:.1f} | {h['batch']:.1f} | "
              f"{h.get('decode', 0):.1f} | "
              f"{h.get('preprocess', 0):.1f} | {h.get('forward', 0):.1f} |")
    print(f"\nencode (json.dumps of an answer, after the handler): {encode:.3f} ms")

    groups = ["client", *PROCESS_GROUPS]
    print(f"\nCPU ms per request by process (all {os.cpu_count()} cores; in-process floor: "
          + ", ".join(f"{arch} {os.cpu_count() * 1000 / reference(f):.1f}" for arch, f in floors.items()) + ")")
    print("| model | concurrency | " + " | ".join(groups) + " | total | cores busy |")
    print("|---" * (len(groups) + 4) + "|")
    for (arch, concurrency), r in results.items():
        cells = " | ".join(f"{r['cpu_ms'][g]:.2f}" for g in groups)
        print(f"| {arch} | {concurrency} | {cells} | {sum(r['cpu_ms'].values()):.1f} | {r['busy']:.0%} |")

    print("\nTargets")
    print(f"| model | x floor at concurrency 8 (>= {MIN_THROUGHPUT_RATIO}) | added ms at concurrency 1 (< {MAX_ADDED_MS:.0f}) "
          f"| worst error rate (<= {MAX_ERROR_RATE:.0%}) |")
    print("|---|---|---|---|")
    for arch in args.models:
        ratio = results[arch, 8]["throughput"] / reference(floors[arch]) if (arch, 8) in results else float("nan")
        added = results[arch, 1]["p50"] - floors[arch]["latency_ms"] if (arch, 1) in results else float("nan")
        rate = max(sum(r["errors"].values()) / r["answered"] for (a, _), r in results.items() if a == arch)
        print(f"| {arch} | {ratio:.2f} {'PASS' if ratio >= MIN_THROUGHPUT_RATIO else 'FAIL'} | "
              f"{added:.1f} {'PASS' if added < MAX_ADDED_MS else 'FAIL'} | "
              f"{rate:.1%} {'PASS' if rate <= MAX_ERROR_RATE else 'FAIL'} |")

    if explain:
        slowdown = explain["busy"]["p99"] / explain["idle"]["p99"]
        print("\nPlain predictions (resnet34, sequential) while High explanations run back to back")
        print("| | p50 ms | p99 ms | errors |")
        print("|---|---|---|---|")
        for name in ("idle", "busy"):
            r = explain[name]
            print(f"| {name} | {r['p50']:.1f} | {r['p99']:.1f} | {sum(r['errors'].values())} |")
        seconds = explain["explanation_seconds"]
        print(f"p99 busy / idle: {slowdown:.2f} {'PASS' if slowdown <= MAX_EXPLAIN_SLOWDOWN else 'FAIL'} "
              f"(<= {MAX_EXPLAIN_SLOWDOWN:.0f}); a High explanation took {seconds or float('nan'):.1f} s meanwhile")


if __name__ == "__main__":
    main()
