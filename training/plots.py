"""Figures written beside the trained weights."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from skinlesion.model import CLASS_CODES  # noqa: E402


def plot_confusion(matrix: list[list[int]], path: str, title: str) -> None:
    """Row-normalised confusion matrix with the counts written in each cell."""
    counts = np.array(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(counts.shape):
        ax.text(j, i, f"{counts[i, j]}\n{rates[i, j]:.0%}", ha="center", va="center", fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(CLASS_CODES)), CLASS_CODES)
    ax.set_yticks(range(len(CLASS_CODES)), CLASS_CODES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: list[dict], path: str, title: str) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["loss"] for r in history], label="train")
    left.plot(epochs, [r["val_loss"] for r in history], label="validation")
    left.set_title("loss")
    right.plot(epochs, [r["accuracy"] for r in history], label="train accuracy")
    right.plot(epochs, [r["val_accuracy"] for r in history], label="validation accuracy")
    right.plot(epochs, [r["val_balanced_accuracy"] for r in history], label="validation balanced accuracy")
    right.set_title("accuracy")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_set_curves(curves: dict[str, list[dict]], path: str) -> None:
    """Per model: prediction-set coverage on the test split against the level asked (the diagonal is exact
    coverage), and the mean set size."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for arch, curve in curves.items():
        levels = [point["level"] for point in curve]
        left.plot(levels, [point["coverage"] for point in curve], marker="o", label=arch)
        right.plot(levels, [point["mean_size"] for point in curve], marker="o", label=arch)
    left.plot([0.5, 1.0], [0.5, 1.0], color="grey", linestyle="--", label="coverage = level")
    left.set_xlabel("level (coverage asked)")
    left.set_ylabel("test coverage")
    right.set_xlabel("level (coverage asked)")
    right.set_ylabel("mean set size (classes)")
    for ax in (left, right):
        ax.legend()
    fig.suptitle("Prediction sets on the test split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(bins: dict[str, list[dict]], path: str) -> None:
    """Reliability diagram per model: accuracy against mean top-label confidence in each confidence bin (marker
    area by the bin's images); on the diagonal, a model is right as often as it says."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for arch, points in bins.items():
        total = sum(point["images"] for point in points)
        ax.plot([p["confidence"] for p in points], [p["accuracy"] for p in points], label=arch)
        ax.scatter([p["confidence"] for p in points], [p["accuracy"] for p in points],
                   s=[2000 * p["images"] / total for p in points], alpha=0.4)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    ax.set_xlabel("calibrated top-label probability")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Reliability on the test split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
