"""What a run writes besides weights and checkpoints: ``loss.csv``, the loss plot and sample grids.

matplotlib (the ``train`` extra) is imported where used: ``fastdiff.cli`` imports the training modules
to register their arguments, and must start fast and report a missing extra itself.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class LossLog:
    """``OUTPUT/loss.csv`` (``step,loss``), written row by row; a resumed run keeps rows up to its start."""

    def __init__(self, path: Path, first_step: int) -> None:
        rows: list[list[str]] = []
        if first_step > 1 and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) < first_step]
        self._file = path.open("w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(["step", "loss"])
        self._writer.writerows(rows)
        self._file.flush()

    def write(self, step: int, loss: float) -> None:
        self._writer.writerow([step, f"{loss:.6g}"])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_loss_csv(path: Path) -> list[float]:
    """Losses of ``loss.csv`` in step order."""
    with path.open(newline="") as f:
        return [float(r[1]) for r in list(csv.reader(f))[1:] if r]


def save_sample_grid(images: torch.Tensor, captions: Sequence[str], path: Path) -> None:
    """Save images as a grid with one row per caption, the caption written left of its row.

    Args:
        images: float tensor ``[len(captions) * columns, 3, H, W]`` in ``[0, 1]``, row-major.
        captions: One caption per row.
        path: PNG file to write (matplotlib, Agg backend).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(captions)
    columns = images.shape[0] // rows
    pixels = images.permute(0, 2, 3, 1).numpy()
    label_width, cell = 2.5, 1.1  # inches
    fig = Figure(figsize=(label_width + cell * columns, cell * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for r, caption in enumerate(captions):
        for c in range(columns):
            ax = axes[r][c]
            ax.imshow(pixels[r * columns + c], interpolation="nearest")
            ax.set_axis_off()
        axes[r][0].text(
            -0.08, 0.5, caption, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8
        )
    left = label_width / (label_width + cell * columns)
    fig.subplots_adjust(left=left, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(path)


def plot_loss(losses: Sequence[float], path: Path, *, title: str) -> None:
    """Plot the per-step loss and its running mean (log scale) to a PNG with matplotlib's Agg backend.

    Args:
        losses: Loss per step; non-finite values are left out of the plot.
        path: PNG file to write.
        title: Figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(values) + 1)
    finite = np.isfinite(values)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps[finite], values[finite], lw=0.8, alpha=0.4, label="loss")
    window = max(1, len(values) // 20)
    if finite.sum() >= window:
        kernel = np.ones(window) / window
        ax.plot(steps[finite][window - 1 :], np.convolve(values[finite], kernel, "valid"), lw=2, label="mean")
    if finite.any():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
