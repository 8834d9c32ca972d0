"""Stability monitoring of a run: the loss-spike detector, and the per-sample losses binned by noise level.

The detector is a one-sided Hampel filter (F. R. Hampel, "The influence curve and its role in robust
estimation", JASA 69, 1974; the rolling form as in Pearson et al., "Generalized Hampel filters", EURASIP
J. Adv. Signal Process. 2016): over a rolling window of the last step losses, a value above
``median + k · s`` with ``s = 1.4826 · MAD`` is an outlier. ``1.4826 = 1 / Φ⁻¹(3/4)`` makes the median
absolute deviation a consistent estimate of the standard deviation for normally distributed values
(Rousseeuw & Croux, "Alternatives to the median absolute deviation", JASA 88, 1993). Only spikes up are
flagged: a loss far below its recent median is progress, not instability.

Pure bookkeeping over floats; it must not know about the models, the loader or the files (the loop
writes what it finds with :mod:`fastdiff.training.outputs`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

#: ``1 / Φ⁻¹(3/4)``: scales the MAD to the standard deviation of normally distributed values.
MAD_SCALE = 1.4826
#: Finite losses the detector must hold before it judges a step (a median of fewer is too noisy).
MIN_HISTORY = 10
#: Bins of the noise level ``[0, 1]`` in the loss-by-timestep table and plot.
NOISE_BINS = 10


@dataclass(frozen=True)
class Spike:
    """A step whose loss the detector flagged.

    Attributes:
        step: The optimizer step (from 1).
        loss: Its loss (the mean over micro-batches and ranks).
        median: Median of the window's losses before it.
        mad: Their median absolute deviation (unscaled).
        threshold: ``median + k * MAD_SCALE * mad``: the loss above which a step is a spike.
    """

    step: int
    loss: float
    median: float
    mad: float
    threshold: float


class SpikeDetector:
    """Rolling median + ``k`` · 1.4826 · MAD of the last ``window`` step losses (see the module doc).

    Args:
        k: Threshold in scaled MADs; 0 turns the detector off (:meth:`check` returns ``None``).
        window: Losses kept (the most recent ones).
    """

    def __init__(self, k: float, window: int) -> None:
        if k < 0 or window < MIN_HISTORY:
            raise ValueError(f"spike detector needs k >= 0 and window >= {MIN_HISTORY}, got {k}, {window}")
        self.k = k
        self.history: deque[float] = deque(maxlen=window)

    def check(self, step: int, loss: float) -> Spike | None:
        """The :class:`Spike` of ``loss`` at ``step`` against the window, or ``None`` (also while the
        window holds fewer than :data:`MIN_HISTORY` losses, for a non-finite loss, or with ``k = 0``).
        Does not add ``loss`` to the window (:meth:`add` does)."""
        if self.k == 0 or len(self.history) < MIN_HISTORY or not np.isfinite(loss):
            return None
        values = np.asarray(self.history, dtype=np.float64)
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median)))
        threshold = median + self.k * MAD_SCALE * mad
        return Spike(step, loss, median, mad, threshold) if loss > threshold else None

    def add(self, loss: float) -> None:
        """Add a finite step loss to the window (a non-finite one is ignored)."""
        if np.isfinite(loss):
            self.history.append(float(loss))

    def state_dict(self) -> dict[str, Any]:
        """The window, for a checkpoint (a resumed run judges as the uninterrupted one)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(float(v) for v in state["history"])


class LossByNoiseLevel:
    """Per-sample losses binned by noise level as they come: ``bins`` equal bins of ``[0, 1]`` (the
    last one closed), a sum and a count each (memory independent of the run's length).

    Args:
        bins: Number of bins.
    """

    def __init__(self, bins: int = NOISE_BINS) -> None:
        self.sums = np.zeros(bins, dtype=np.float64)
        self.counts = np.zeros(bins, dtype=np.int64)

    def add(self, levels: np.ndarray, losses: np.ndarray) -> None:
        """Add samples: noise levels float ``[N]`` in ``[0, 1]``
        (:attr:`fastdiff.training.objective.SampleLosses.noise_levels`) and their unweighted losses
        float ``[N]``; non-finite losses are left out."""
        levels = np.asarray(levels, dtype=np.float64)
        losses = np.asarray(losses, dtype=np.float64)
        keep = np.isfinite(losses)
        bins = self.sums.size
        index = np.clip((levels[keep] * bins).astype(np.int64), 0, bins - 1)
        np.add.at(self.sums, index, losses[keep])
        np.add.at(self.counts, index, 1)

    def merge(self, other: LossByNoiseLevel) -> None:
        """Add another accumulator's samples (another rank's)."""
        self.sums += other.sums
        self.counts += other.counts

    def rows(self) -> list[dict[str, float]]:
        """One row per bin: ``low``, ``high`` (its edges), ``count`` and ``mean_loss`` (``nan`` if empty)."""
        bins = self.sums.size
        return [
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": float(self.counts[b]),
                "mean_loss": float(self.sums[b] / self.counts[b]) if self.counts[b] else float("nan"),
            }
            for b in range(bins)
        ]
