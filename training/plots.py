"""Training curves and confusion matrices as PNG files, drawn headless (matplotlib's Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a worker or CI has no display; never plt.show()

import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import NDArray


def plot_history(history: Mapping[str, Sequence[float]], metric: str, path: Path) -> Path:
    """Plot `metric` and `val_<metric>` per epoch, like the notebooks' loss/accuracy figures."""
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = np.arange(1, len(history[metric]) + 1)
    axes.plot(epochs, history[metric], color="teal", label=metric)
    validation = f"val_{metric}"
    if validation in history:
        axes.plot(epochs, history[validation], color="orange", label=validation)
    axes.set_title(metric.capitalize())
    axes.set_xlabel("epoch")
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_confusion_matrix(
    matrix: NDArray[np.int64], class_names: Sequence[str], path: Path, title: str
) -> Path:
    """Draw counts with row-normalised shading (rows are true classes)."""
    size = max(4.0, 0.8 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size), dpi=100)
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    axes.imshow(matrix / totals, cmap="Blues", vmin=0, vmax=1)
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            shade = matrix[row, column] / totals[row, 0]
            axes.text(
                column,
                row,
                str(matrix[row, column]),
                ha="center",
                va="center",
                color="white" if shade > 0.5 else "black",
            )
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right")
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_reliability(
    curves: Mapping[str, Sequence[Mapping[str, float]]], path: Path, title: str
) -> Path:
    """A reliability diagram: accuracy against mean confidence per bin, one curve per name
    (e.g. before and after calibration), the diagonal being perfect calibration; marker area
    shows how many images each bin holds."""
    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for (name, bins), color in zip(curves.items(), ("orange", "teal", "purple"), strict=False):
        if not bins:
            continue
        total = sum(b["count"] for b in bins)
        axes.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            color=color,
            marker="o",
            label=name,
        )
        axes.scatter(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            s=[20 + 400 * b["count"] / max(total, 1) for b in bins],
            color=color,
            alpha=0.3,
        )
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence (mean per bin)")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
