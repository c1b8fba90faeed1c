"""Compare training recipes on the validation split: each lever against the current recipe, over seeds.

    python -m training.ablation ROOT [--type resnet18] [--epochs 10] [--seeds 0 1] [--levers ...] [--report-only]
        [--training-flags "--device cuda --workers 4"] [--parallel 4]

Each run is `python -m training ... --validation-only` into runs/ablation/, logged beside it. The command can
be rerun: a finished run is read, not repeated, and an interrupted one continues with --resume. A seed fixes
both the initial weights and the lesion-grouped validation split, so each lever is compared with the current
recipe on the same images. The figures are the final epoch's weights: the best epoch is picked on these same
images, which would flatter every row. The test split is never read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from skinlesion.model import build_model
from training.data import split_dataset
from training.train import evaluate, load_images

# Lever name -> the training flags that turn it on. Every run tracks an EMA of the weights (the default, which
# changes nothing in training) and logs the raw weights' figures beside it: the rows compare the raw weights,
# and the "ema" row, which costs no run of its own, the current recipe's average; "tta-*" rows re-evaluate the
# current recipe's final weights over more views.
LEVERS: dict[str, list[str]] = {
    "current": [],
    "rotation-180": ["--rotation", "180"],
    "logit-adjusted": ["--loss", "logit-adjusted"],
    "shades-of-gray": ["--colour-constancy", "6"],
    "mixup": ["--mixup", "0.2"],
    "cutmix": ["--cutmix", "1.0"],
}
DERIVED = {"ema": "current", "tta-flips": "current", "tta-dihedral": "current"}
METRICS = ("val_balanced_accuracy", "val_accuracy", "val_macro_auc", "val_melanoma_auc")
HEADERS = ("balanced acc.", "accuracy", "macro AUC", "melanoma AUC")


def run_name(lever: str, arch: str, epochs: int, seed: int) -> str:
    return f"{lever}-{arch}-e{epochs}-s{seed}"


def train_run(args: argparse.Namespace, lever: str, seed: int) -> None:
    """Train one (lever, seed) unless its report exists, continuing an interrupted run."""
    name = run_name(lever, args.type, args.epochs, seed)
    checkpoints = args.out / "checkpoints"
    last = checkpoints / name / "last.pt"
    if not (args.out / f"{name}.json").exists():
        command = [sys.executable, "-m", "training", str(args.root), "--type", args.type, "--epochs", str(args.epochs),
                   "--seed", str(seed), "--model-name", str(args.out / f"{name}.pt"), "--checkpoint-dir", str(checkpoints),
                   "--validation-only", *args.training_flags.split(), *LEVERS[lever]]
        if last.exists():
            command.append("--resume")
        print(f"training {name}: {' '.join(command[1:])}", flush=True)
        with open(args.out / f"{name}.log", "a") as log:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def final_metrics(last: Path, report: dict, weights: str = "model", views: str = "none") -> dict:
    """Validation metrics of a run's final epoch (`weights`: "model" or "ema") over that many TTA views."""
    state = torch.load(last, map_location="cpu", weights_only=False)[weights]
    if weights == "ema":
        state = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
    arguments = report["arguments"]
    model = build_model(arguments["type"])
    model.load_state_dict(state)
    val_set = split_dataset(arguments["root"], arguments.get("split_seed", arguments["seed"]))[1]
    inputs = load_images(val_set, tuple(arguments["image_size"]), "validation images", arguments["colour_constancy"])
    return evaluate(model.to(memory_format=torch.channels_last), torch.stack(inputs),
                    torch.tensor([s.label for s in val_set]), "cpu", views)


def score(args: argparse.Namespace, lever: str, seed: int) -> dict | None:
    """The (lever, seed) row's metrics, or None when its run has not finished."""
    source = DERIVED.get(lever, lever)
    name = run_name(source, args.type, args.epochs, seed)
    report_path = args.out / f"{name}.json"
    if not report_path.exists():
        return None
    cache = args.out / f"{run_name(lever, args.type, args.epochs, seed)}.metrics.json"
    if cache.exists() and cache.stat().st_mtime >= report_path.stat().st_mtime:  # else the run was redone since
        return json.loads(cache.read_text())
    report = json.loads(report_path.read_text())
    last = args.out / "checkpoints" / name / "last.pt"
    if lever in ("tta-flips", "tta-dihedral"):
        metrics = final_metrics(last, report, views=lever.removeprefix("tta-"))
    elif lever == "ema":
        metrics = final_metrics(last, report, weights="ema")
    else:
        # The raw weights' final-epoch row (raw_* when the run also tracked an EMA).
        final = report["history"][-1]
        metrics = {m: final.get(f"raw_{m}", final[m]) for m in METRICS}
    metrics["training_seconds"] = report["training_seconds"]
    cache.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_table(rows: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    """Markdown: per lever, each metric's mean (min-max over seeds), and the mean paired change in balanced
    accuracy against the current recipe on the same seeds."""
    lines = ["| lever | seeds | " + " | ".join(HEADERS) + " | Δ balanced acc. |", "|---" * (len(HEADERS) + 3) + "|"]
    for lever, by_seed in rows.items():
        if not by_seed:
            continue
        cells = []
        for metric in METRICS:
            values = np.array([by_seed[s][metric] for s in by_seed], dtype=float)  # null (undefined) -> nan
            cells.append(f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})")
        paired = [by_seed[s]["val_balanced_accuracy"] - rows["current"][s]["val_balanced_accuracy"]
                  for s in by_seed if s in rows.get("current", {})]
        delta = f"{np.mean(paired):+.3f}" if paired and lever != "current" else "—"
        lines.append(f"| {lever} | {','.join(map(str, sorted(by_seed)))} | " + " | ".join(cells) + f" | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--type", default="resnet18")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--levers", nargs="+", choices=[*LEVERS, *DERIVED], default=[*LEVERS, *DERIVED])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--training-flags", default="", help="more flags for every run of python -m training")
    parser.add_argument("--report-only", action="store_true", help="train nothing; tabulate the finished runs")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs trained at once (on a GPU one run leaves most of it idle; on a CPU keep 1)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        # Seed by seed, so an interrupted ablation has every lever at its first seed before any at its second.
        trained = dict.fromkeys(DERIVED.get(lever, lever) for lever in args.levers)
        runs = [(lever, seed) for seed in args.seeds for lever in trained]
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            for _ in pool.map(lambda run: train_run(args, *run), runs):  # re-raises a failed run's error
                pass
    rows = {lever: {} for lever in dict.fromkeys(["current", *args.levers])}
    for lever in rows:
        for seed in args.seeds:
            metrics = score(args, lever, seed)
            if metrics is not None:
                rows[lever][seed] = metrics
    print(f"{args.type}, {args.epochs} epochs, final epoch on each seed's validation split")
    print(format_table(rows, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
