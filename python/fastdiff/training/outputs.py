"""What a run writes besides weights and checkpoints: ``loss.csv``, ``spikes.jsonl``, the loss plots
(by step, by timestep) and sample grids.

matplotlib (the ``train`` extra) is imported where used: ``fastdiff.cli`` imports the training modules
to register their arguments, and must start fast and report a missing extra itself.
"""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

#: Columns of ``loss.csv``: the step (from 1), its loss (mean over micro-batches and ranks; ``nan``
#: where not finite), the global L2 gradient norm before clipping (``nan`` where the loss was not
#: finite) and the learning rate the step used.
LOSS_COLUMNS = ("step", "loss", "grad_norm", "lr")
#: Width in pixels of a sample grid's caption column, its characters per line and line height (Pillow's
#: default font, about 6 by 11 pixels a character).
GRID_LABEL_WIDTH = 160
GRID_LABEL_CHARS = 25
GRID_LINE_HEIGHT = 13


def _kept_lines(path: Path, first_step: int, step_of: Callable[[str], int]) -> list[str]:
    """The lines of ``path`` whose step (``step_of(line)``) is before ``first_step``; lines it cannot
    read a step from (the header) are left out."""
    if first_step <= 1 or not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if step_of(line) < first_step:
                kept.append(line)
        except (ValueError, KeyError, IndexError):
            continue
    return kept


class LossLog:
    """``OUTPUT/loss.csv`` (:data:`LOSS_COLUMNS`), written row by row; a resumed run keeps rows up to
    its start (rows of an older file with only ``step,loss`` are kept as they are)."""

    def __init__(self, path: Path, first_step: int) -> None:
        rows = _kept_lines(path, first_step, lambda line: int(line.split(",")[0]))
        self._file = path.open("w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(LOSS_COLUMNS)
        for row in rows:
            self._file.write(row + "\r\n")  # csv.writer's line ending
        self._file.flush()

    def write(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        self._writer.writerow([step, f"{loss:.6g}", f"{grad_norm:.6g}", f"{lr:.6g}"])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


#: Columns of ``val_loss.csv``: the step after which the validation loss was computed, the loss
#: (mean over the validation images, written with all its digits) and the number of images.
VAL_LOSS_COLUMNS = ("step", "val_loss", "images")


class ValidationLog:
    """``OUTPUT/val_loss.csv`` (:data:`VAL_LOSS_COLUMNS`), a row per evaluation; a resumed run keeps
    the rows of steps before its start."""

    def __init__(self, path: Path, first_step: int) -> None:
        rows = _kept_lines(path, first_step, lambda line: int(line.split(",")[0]))
        self._file = path.open("w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(VAL_LOSS_COLUMNS)
        for row in rows:
            self._file.write(row + "\r\n")
        self._file.flush()

    def write(self, step: int, loss: float, images: int) -> None:
        self._writer.writerow([step, repr(loss), images])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_val_loss_csv(path: Path) -> list[tuple[int, float]]:
    """``(step, val_loss)`` rows of a ``val_loss.csv`` (none if the file is absent)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [(int(r[0]), float(r[1])) for r in list(csv.reader(f))[1:] if r]


def read_loss_csv(path: Path) -> list[float]:
    """Losses of ``loss.csv`` in step order."""
    with path.open(newline="") as f:
        return [float(r[1]) for r in list(csv.reader(f))[1:] if r]


class SpikeLog:
    """``OUTPUT/spikes.jsonl``: one JSON object per line and flagged step (``step``, ``loss``,
    ``median``, ``mad``, ``threshold``, ``skipped``, ``paths``: every rank's batch, rank order); a
    resumed run keeps the lines of steps before its start."""

    def __init__(self, path: Path, first_step: int) -> None:
        lines = _kept_lines(path, first_step, lambda line: int(json.loads(line)["step"]))
        self._file = path.open("w")
        self._file.writelines(line + "\n" for line in lines)
        self._file.flush()

    def write(self, record: Mapping[str, object]) -> None:
        self._file.write(json.dumps(dict(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_spikes(path: Path) -> list[dict[str, object]]:
    """The records of a ``spikes.jsonl`` (none if the file is absent)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_sample_grid(images: torch.Tensor, captions: Sequence[str], path: Path) -> None:
    """Save images as a grid with one row per caption, the caption written in a white column of
    :data:`GRID_LABEL_WIDTH` pixels left of its row (wrapped, cut to the row's height), each image at
    its own pixels: an RGB PNG of ``GRID_LABEL_WIDTH + columns * W`` by ``len(captions) * H`` pixels
    (Pillow; values rounded to 8 bits).

    Args:
        images: float tensor ``[len(captions) * columns, 3, H, W]`` in ``[0, 1]``, row-major.
        captions: One caption per row.
        path: PNG file to write.
    """
    from PIL import Image, ImageDraw

    rows = len(captions)
    columns = images.shape[0] // rows
    height, width = images.shape[2:]
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = Image.new("RGB", (GRID_LABEL_WIDTH + columns * width, rows * height), "white")
    draw = ImageDraw.Draw(grid)
    for r, caption in enumerate(captions):
        for c in range(columns):
            grid.paste(Image.fromarray(pixels[r * columns + c]), (GRID_LABEL_WIDTH + c * width, r * height))
        lines = textwrap.wrap(caption, GRID_LABEL_CHARS)[: max(1, height // GRID_LINE_HEIGHT)]
        draw.multiline_text((4, r * height + 2), "\n".join(lines), fill="black", spacing=2)
    grid.save(path)


def plot_loss(
    losses: Sequence[float],
    path: Path,
    *,
    title: str,
    validation: Sequence[tuple[int, float]] = (),
) -> None:
    """Plot the per-step loss and its running mean (log scale) to a PNG with matplotlib's Agg backend,
    with the validation loss over the steps it was computed at.

    Args:
        losses: Loss per step; non-finite values are left out of the plot.
        path: PNG file to write.
        title: Figure title.
        validation: ``(step, validation loss)`` points (:func:`read_val_loss_csv`).
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
    points = [(s, v) for s, v in validation if np.isfinite(v)]
    if points:
        ax.plot(*zip(*points, strict=True), "o-", lw=1.5, ms=4, label="validation")
    if finite.any():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def write_loss_by_timestep(
    rows: Sequence[Mapping[str, float]], csv_path: Path, png_path: Path, *, title: str
) -> None:
    """Write the loss-by-noise-level table (:meth:`fastdiff.training.monitor.LossByNoiseLevel.rows`) as
    ``low,high,count,mean_loss`` to ``csv_path`` and as a bar plot (matplotlib, Agg) to ``png_path``.

    The x axis is the noise level in ``[0, 1]`` (``t / T`` for DDPM, sigma for flow matching; 1 is
    pure noise), the bars the mean unweighted per-sample MSE of the samples trained at it: where the
    model's error is (for ε-prediction it is largest at low noise, for the velocity near ``t = 0``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["low", "high", "count", "mean_loss"])
        for r in rows:
            writer.writerow([f"{r['low']:g}", f"{r['high']:g}", int(r["count"]), f"{r['mean_loss']:.6g}"])
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    centres = [(r["low"] + r["high"]) / 2 for r in rows]
    widths = [0.9 * (r["high"] - r["low"]) for r in rows]
    ax.bar(centres, [r["mean_loss"] for r in rows], width=widths)
    for x, r in zip(centres, rows, strict=True):
        ax.annotate(
            f"{int(r['count'])}", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7
        )
    ax.set_xlim(0, 1)
    ax.set_xlabel("noise level (t / T; 1 = pure noise)")
    ax.set_ylabel("mean per-sample MSE")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
