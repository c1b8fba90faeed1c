"""The training loop: a ResNet on HAM10000, in the shape of torchvision's references/classification/train.py.

    python -m training ROOT [--type resnet34] [--epochs 70] [--model-name model_store/<type>.pt] [--fine-tune] ...

The final epoch's weights (by default their moving average) or, with --select best, the epoch with the best
validation balanced accuracy is saved, calibrated (training.calibrate) and scored once on the test split; beside
it go <name>.json, <name>_confusion.png and <name>_curves.png.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from skinlesion.image import (
    ROTATION_DEGREES,
    decode_image,
    dihedral_views,
    normalize,
    resize,
    shades_of_gray,
    train_transform,
)
from skinlesion.model import ARCHITECTURES, CLASS_CODES, DEFAULT_IMAGE_SIZE, build_model, load_checkpoint, save_checkpoint
from skinlesion.predictor import native_bfloat16
from training.calibrate import calibrate_checkpoint
from training.compare_calibrators import add_comparison_argument
from training.data import Sample, split_dataset
from training.evaluate import compute_metrics, format_report, to_json
from training.plots import plot_confusion, plot_curves
from training.reports import format_calibration

# Share of the one-cycle schedule spent warming the learning rate up.
WARMUP_FRACTION = 0.15
LABEL_SMOOTHING = 0.05
EMA_DECAY = 0.995
VALIDATION_BATCH = 128
# Knowledge distillation (Hinton et al. 2015): half the loss from the teachers, at a temperature that keeps
# their ranking of the runner-up classes visible.
DISTILL_WEIGHT = 0.5
DISTILL_TEMPERATURE = 2.0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="Train a ResNet on HAM10000.")
    p.add_argument("root", type=Path, help="HAM10000 folder: metadata CSV plus images (train/test folders optional)")
    p.add_argument("--epochs", type=int, default=70)
    p.add_argument("--model-name", "--modelname", dest="modelname", type=Path, default=None,
                   help="output weights (default model_store/<type>.pt; runs/<type>.pt with --validation-only, --train-on-test)")
    p.add_argument("--fine-tune", "--fine_tune", dest="fine_tune", action="store_true", help="train only the last layer")
    p.add_argument("--type", choices=sorted(ARCHITECTURES), default="resnet34")
    p.add_argument("--weights", default="none", help="initial weights: imagenet, none, or a checkpoint PATH")
    p.add_argument("--image-size", type=int, nargs=2, default=DEFAULT_IMAGE_SIZE, metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the lesion-grouped validation split (default: --seed); fix it to train several seeds, "
                   "e.g. teachers for --teacher, on the same split")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: where the device computes bfloat16 natively; emulated, it is "
                   "many times slower than float32)")
    p.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("runs"), help="per-epoch checkpoints (for --resume)")
    # Recipe levers (docs/training.md); the defaults are the shipped weights' recipe.
    p.add_argument("--rotation", type=float, default=ROTATION_DEGREES, help="largest random rotation in degrees (180: any)")
    p.add_argument("--loss", choices=("weighted", "logit-adjusted"), default="weighted",
                   help="weighted: cross-entropy with 1/sqrt(frequency) class weights; logit-adjusted: unweighted "
                   "cross-entropy on logits + log(class prior) (Menon et al. 2021)")
    p.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING)
    p.add_argument("--ema", type=float, default=EMA_DECAY, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights; 0: off")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup of training batches; 0: off")
    p.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="CutMix of training batches; 0: off (with --mixup too, each batch gets one of the two)")
    p.add_argument("--colour-constancy", type=float, default=0.0, metavar="POWER",
                   help="Shades of Gray colour constancy of this power in the preprocessing (6 as in ISIC 2019's "
                   "winner), stored in the checkpoint so serving applies it too; 0: off")
    p.add_argument("--select", choices=("best", "final"), default="final",
                   help="the epoch whose weights are saved: best by validation balanced accuracy, or the final one, "
                   "which leaves the validation split out of the choice so that calibration fitted on it is unbiased")
    p.add_argument("--teacher", nargs="+", default=[], metavar="CHECKPOINT",
                   help="knowledge distillation: also learn the averaged predictions of these checkpoints (an ensemble "
                   "of seeds, or a larger model) on each augmented batch; they must share the preprocessing and, for "
                   "an honest validation, the validation split (--split-seed)")
    p.add_argument("--distill-weight", type=float, default=DISTILL_WEIGHT,
                   help="share of the loss that matches the teachers (the rest is the labels' loss)")
    p.add_argument("--distill-temperature", type=float, default=DISTILL_TEMPERATURE,
                   help="softmax temperature of teacher and student in the distillation loss")
    p.add_argument("--validation-only", action="store_true",
                   help="for recipe comparisons (training.ablation): skip calibration and the test split; the report "
                   "holds the validation history only")
    p.add_argument("--train-on-test", action="store_true",
                   help="once a recipe is fixed: train on the test split too (the validation split stays out); the "
                   "test split is not scored, and training.calibrate --held-out REPORT carries the test figures of the "
                   "same recipe's run that held it out")
    add_comparison_argument(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    # Weights without their own calibration and test figures must not replace the shipped ones.
    unscored = args.validation_only or args.train_on_test
    args.modelname = args.modelname or Path("runs" if unscored else "model_store") / f"{args.type}.pt"
    args.image_size = tuple(args.image_size)
    if args.split_seed is None:
        args.split_seed = args.seed
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.amp is None:
        args.amp = native_bfloat16(args.device)
    return args


class AugmentedImages(torch.utils.data.Dataset):
    """Decoded training photos through the training preset (skinlesion.image.train_transform)."""

    def __init__(self, images: list[torch.Tensor], labels: list[int], image_size: tuple[int, int],
                 rotation: float = ROTATION_DEGREES) -> None:
        self.images, self.labels = images, labels
        self.transform = train_transform(image_size, rotation)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return normalize(self.transform(self.images[i])), self.labels[i]


def load_images(samples: list[Sample], size: tuple[int, int] | None, what: str,
                colour_constancy: float = 0.0) -> list[torch.Tensor]:
    """uint8 tensors: resized to `size` (exactly the serving preprocessing) or, without it, as decoded; with
    colour constancy of that power either way."""
    images = []
    for s in tqdm(samples, desc=f"decoding {what}", leave=False):
        image = decode_image(s.path.read_bytes())
        if size:
            images.append(resize(image, size, colour_constancy))
        else:
            image = v2.functional.pil_to_tensor(image)
            images.append(shades_of_gray(image, colour_constancy) if colour_constancy else image)
    return images


def load_data(args: argparse.Namespace, train_set: list[Sample], val_set: list[Sample]
              ) -> tuple[torch.utils.data.DataLoader, torch.Tensor, torch.Tensor]:
    """The augmented training loader, and the validation photos preprocessed as served, with their labels."""
    loader = torch.utils.data.DataLoader(
        AugmentedImages(load_images(train_set, None, "training images", args.colour_constancy),
                        [s.label for s in train_set], args.image_size, args.rotation),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    val_inputs = torch.stack(load_images(val_set, args.image_size, "validation images", args.colour_constancy))
    return loader, val_inputs, torch.tensor([s.label for s in val_set])


def build_training_model(args: argparse.Namespace) -> nn.Module:
    if args.weights == "imagenet":
        try:
            model = build_model(args.type, imagenet=True)
        except OSError as exc:
            sys.exit(f"error: could not download torchvision's ImageNet weights ({exc}); use --weights none offline")
    elif args.weights == "none":
        model = build_model(args.type)
    else:
        model, meta = load_checkpoint(args.weights)
        if meta["arch"] != args.type:
            sys.exit(f"error: {args.weights} holds a {meta['arch']}, not a {args.type}")
    if args.fine_tune:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith("fc.")
    return model.to(args.device, memory_format=torch.channels_last)


def load_teachers(args: argparse.Namespace) -> list[nn.Module]:
    """The --teacher checkpoints, frozen, in eval mode; each must see the inputs exactly as the student does."""
    teachers = []
    for path in args.teacher:
        model, meta = load_checkpoint(path, args.device)
        if meta["image_size"] != args.image_size or meta["colour_constancy"] != args.colour_constancy:
            sys.exit(f"error: teacher {path} was trained at {meta['image_size']} with colour constancy "
                     f"{meta['colour_constancy']}, this run uses {args.image_size} and {args.colour_constancy}")
        teachers.append(model.requires_grad_(False).to(memory_format=torch.channels_last))
    return teachers


def distillation_loss(logits: torch.Tensor, teacher_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """KL divergence from the teachers' averaged softened probabilities to the student's, scaled by T^2 so its
    gradients keep their size whatever the temperature."""
    target = torch.stack([(t.float() / temperature).softmax(1) for t in teacher_logits]).mean(0)
    student = (logits.float() / temperature).log_softmax(1)
    return nn.functional.kl_div(student, target, reduction="batchmean") * temperature**2


def build_mixing(args: argparse.Namespace) -> nn.Module | None:
    """Mixup, CutMix, a random one of the two per batch, or None."""
    n = len(CLASS_CODES)
    mixes = ([v2.MixUp(alpha=args.mixup, num_classes=n)] if args.mixup > 0 else []) + (
        [v2.CutMix(alpha=args.cutmix, num_classes=n)] if args.cutmix > 0 else [])
    return v2.RandomChoice(mixes) if len(mixes) == 2 else (mixes[0] if mixes else None)


def class_weights(labels: list[int]) -> torch.Tensor:
    """Loss weights proportional to 1/sqrt(class frequency): minority classes count more, not absurdly more."""
    counts = np.bincount(labels, minlength=len(CLASS_CODES)).astype(np.float64)
    weights = 1.0 / np.sqrt(np.maximum(counts, 1))
    return torch.tensor(weights / (weights * counts).sum() * counts.sum(), dtype=torch.float32)


def build_criterion(args: argparse.Namespace, labels: list[int]) -> tuple[nn.Module, torch.Tensor]:
    """The loss, and what is added to the logits before it (log class priors for the logit-adjusted loss)."""
    if args.loss == "weighted":
        criterion = nn.CrossEntropyLoss(weight=class_weights(labels).to(args.device), label_smoothing=args.label_smoothing)
        return criterion, torch.zeros(len(CLASS_CODES), device=args.device)
    counts = np.bincount(labels, minlength=len(CLASS_CODES)).astype(np.float64)
    prior = torch.tensor(np.log(np.maximum(counts, 1) / counts.sum()), dtype=torch.float32, device=args.device)
    return nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), prior


def train_one_epoch(model: nn.Module, criterion: nn.Module, logit_offset: torch.Tensor, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loader: torch.utils.data.DataLoader,
                    args: argparse.Namespace, epoch: int, mixing: nn.Module | None = None,
                    ema: torch.optim.swa_utils.AveragedModel | None = None, teachers: Sequence[nn.Module] = ()) -> dict:
    """One pass over the training photos; the epoch's mean loss and accuracy (against the unmixed labels)."""
    model.train()
    seen = correct = 0
    total_loss = 0.0
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False)
    for inputs, labels in bar:
        inputs = inputs.to(args.device, memory_format=torch.channels_last)
        labels = labels.to(args.device)
        targets = labels
        if mixing is not None:
            inputs, targets = mixing(inputs, labels)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(inputs)
            if teachers:
                with torch.no_grad():
                    teacher_logits = [teacher(inputs) for teacher in teachers]
        loss = criterion(logits.float() + logit_offset, targets)
        if teachers:
            loss = ((1 - args.distill_weight) * loss
                    + args.distill_weight * distillation_loss(logits, teacher_logits, args.distill_temperature))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        seen += len(labels)
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"epoch": epoch, "loss": total_loss / seen, "accuracy": correct / seen}


def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: str, views: str = "none") -> dict:
    """Validation metrics for preprocessed uint8 inputs, the logits averaged over that many TTA views."""
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([
            torch.stack([model(view).float() for view in dihedral_views(normalize(chunk).to(device), views)]).mean(0).cpu()
            for chunk in inputs.split(VALIDATION_BATCH)
        ])
    metrics = compute_metrics(labels.numpy(), logits.softmax(1).numpy())
    return {
        "val_loss": float(nn.functional.cross_entropy(logits, labels)),
        "val_accuracy": metrics["accuracy"],
        "val_balanced_accuracy": metrics["balanced_accuracy"],
        "val_macro_auc": metrics["macro_auc"],
        "val_melanoma_auc": metrics["melanoma_auc"],
    }


def train(args: argparse.Namespace) -> dict:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_set, val_set, test_set = split_dataset(args.root, args.split_seed, train_on_test=args.train_on_test)
    print(f"images: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} test", flush=True)

    model = build_training_model(args)
    teachers = load_teachers(args)
    loader, val_inputs, val_labels = load_data(args, train_set, val_set)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * len(loader),
                                                    pct_start=WARMUP_FRACTION)
    criterion, logit_offset = build_criterion(args, [s.label for s in train_set])
    mixing = build_mixing(args)
    # The weights that are validated and saved: the trained ones, or their moving average.
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema),
                                               use_buffers=True) if args.ema > 0 else None)
    evaluated = ema.module if ema is not None else model

    run_dir = args.checkpoint_dir / args.modelname.stem
    run_dir.mkdir(parents=True, exist_ok=True)
    args.modelname.parent.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "best": -1.0, "saved_epoch": 0, "history": [], "seconds": 0.0}
    if args.resume and (run_dir / "last.pt").exists():
        # On the CPU: torch.set_rng_state accepts only a CPU tensor; load_state_dict moves the rest to the device.
        saved = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        if saved["scheduler"]["total_steps"] != scheduler.total_steps:
            sys.exit(
                f"error: {run_dir / 'last.pt'} continues a {saved['scheduler']['total_steps']}-step schedule, but this run has "
                f"{scheduler.total_steps} steps ({args.epochs} epochs of {len(loader)} batches); resume with the same "
                "--epochs, --batch-size and data, or start over without --resume"
            )
        model.load_state_dict(saved["model"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
        print(f"resumed after epoch {state['epoch']} from {run_dir / 'last.pt'}", flush=True)

    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        start = time.time()
        row = train_one_epoch(model, criterion, logit_offset, optimizer, scheduler, loader, args, epoch, mixing, ema,
                              teachers)
        row.update(evaluate(evaluated, val_inputs, val_labels, args.device))
        if ema is not None:
            # The raw weights' figures too: the EMA changes what is evaluated, not how training goes.
            row.update({f"raw_{k}": v for k, v in evaluate(model, val_inputs, val_labels, args.device).items()})
        state["seconds"] += time.time() - start
        state["history"].append(row)
        if args.select == "best":
            keep = row["val_balanced_accuracy"] > state["best"]
            state["best"] = max(state["best"], row["val_balanced_accuracy"])
        else:
            keep = epoch == args.epochs
        if keep:
            state["saved_epoch"] = epoch
            save_checkpoint(evaluated, args.type, args.image_size, args.modelname, args.colour_constancy)
        state["epoch"] = epoch
        # Written beside, then renamed: a run stopped while saving keeps its previous epoch to resume from.
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": torch.get_rng_state(), "state": state, "ema": ema.state_dict() if ema is not None else None},
            run_dir / "last.pt.partial",
        )
        (run_dir / "last.pt.partial").replace(run_dir / "last.pt")
        print(
            f"epoch {epoch:>3}/{args.epochs}  loss {row['loss']:.4f}  acc {row['accuracy']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  "
            f"val_bal_acc {row['val_balanced_accuracy']:.4f}  {time.time() - start:.0f}s" + ("  *saved" if keep else ""),
            flush=True,
        )
    return write_report(args, state, train_set, val_set, test_set)


def write_report(args: argparse.Namespace, state: dict, train_set: list[Sample], val_set: list[Sample],
                 test_set: list[Sample]) -> dict:
    """Calibrate the saved epoch's weights, score the test split once with calibrated probabilities (exactly as
    served), and write the report and figures beside the weights (with --validation-only or --train-on-test: the
    history and its curves alone)."""
    report = {
        "model": args.type,
        "weights": str(args.modelname),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "images": {"train": len(train_set), "validation": len(val_set), "test": len(test_set)},
        "training_seconds": round(state["seconds"], 1),
        "saved_epoch": state["history"][state["saved_epoch"] - 1],
        "history": state["history"],
    }
    stem = args.modelname.with_suffix("")
    plot_curves(state["history"], f"{stem}_curves.png", args.type)
    if args.validation_only or args.train_on_test:
        Path(f"{stem}.json").write_text(to_json(report))
        return report
    calibrated = calibrate_checkpoint(args.modelname, train_set, val_set, test_set, comparison=args.comparison)
    test_metrics = calibrated["test"]
    print(format_report(test_metrics), flush=True)
    print(format_calibration(calibrated["calibration"]), flush=True)
    report.update(test=test_metrics, calibration=calibrated["calibration"])
    Path(f"{stem}.json").write_text(to_json(report))
    plot_confusion(test_metrics["confusion_matrix"], f"{stem}_confusion.png", f"{args.type} on the test split")
    return report

