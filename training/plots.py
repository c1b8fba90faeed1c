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
