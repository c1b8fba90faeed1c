"""What each way of running plain predictions costs in-process (test-time views, bfloat16 trunk: set per
checkpoint by `python -m training.calibrate --views --bfloat16`), against one float32 view in the same run.

    .venv/bin/python bench/inference.py [--models resnet18 resnet34] [--threads 2] [--repeats 30]

Per mode: the median latency of Predictor.predict on one 600x450 photo (what a request at concurrency 1 waits
for in the worker) and its throughput in batches of 8 (TorchServe's batching), each as a multiple of the
reference. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

from bench.latency import median_seconds
from skinlesion.image import decode_image
from skinlesion.predictor import Predictor, native_bfloat16

ROOT = Path(__file__).resolve().parent.parent
FULLRES = ROOT.parent / "shared" / "data" / "ham10000-fullres"
# (views, bfloat16); the first is the reference.
MODES = (("none", False), ("none", True), ("flips", False), ("flips", True), ("dihedral", True))
BATCH = 8


def with_mode(predictor: Predictor, views: str, bfloat16: bool) -> Predictor:
    calibration = dataclasses.replace(predictor.calibration, views=views, bfloat16=bfloat16)
    return Predictor(predictor.model, predictor.arch, predictor.image_size, calibration=calibration,
                     card=predictor.card, colour_constancy=predictor.colour_constancy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet34"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    photos = [decode_image(p.read_bytes()) for p in sorted(FULLRES.glob("*.jpg"))[:BATCH]]
    print(f"torch threads {args.threads}, CPUs {os.cpu_count()}, native bfloat16 {native_bfloat16('cpu')}, "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    print("| model | views | trunk | 1-image latency ms | x reference | batch-8 img/s | x reference |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        shipped = Predictor.from_checkpoint(ROOT / "model_store" / f"{model}.pt")
        reference = None
        for views, bfloat16 in MODES:
            predictor = with_mode(shipped, views, bfloat16)
            latency = median_seconds(lambda p=predictor: p.predict(photos[:1]), args.repeats) * 1000
            throughput = BATCH / median_seconds(lambda p=predictor: p.predict(photos), max(3, args.repeats // 4))
            reference = reference or (latency, throughput)
            print(f"| {model} | {views} | {'bfloat16' if predictor.bfloat16 else 'float32'} | {latency:.1f} | "
                  f"{latency / reference[0]:.2f} | {throughput:.1f} | {throughput / reference[1]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
