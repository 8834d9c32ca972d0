"""Where a run's figures go besides its CSV and PNG files: TensorBoard event files (``--report-to
tensorboard``).

:class:`TensorBoardTracker` writes through torch's ``torch.utils.tensorboard.SummaryWriter`` (which
needs the ``tensorboard`` package, in the ``train`` extra) into ``OUTPUT/tensorboard/``; read it with
``tensorboard --logdir OUTPUT/tensorboard``. Tags: ``train/loss``, ``train/grad_norm``, ``train/lr``,
``train/skipped_steps`` (the run's count so far), ``train/data_wait_share`` (the part of the loop's
wall time so far spent waiting for batches, 0-1), ``val/loss`` and the preview grids as
``previews/WxH``, one per preview size (``[3, H, W]`` images in ``[0, 1]``). Weights & Biases is not
offered: it is not installed here.

It must not know about the models, the loader or the settings beyond the folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

#: Values of ``--report-to``.
REPORT_TO = ("none", "tensorboard")
#: The folder under the run's output that TensorBoard's event files go to.
TENSORBOARD_DIR = "tensorboard"


class Tracker(Protocol):
    """What the loop sends a tracker: scalars and images by tag, at a step."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def image(self, step: int, tag: str, image: torch.Tensor) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """TensorBoard event files in ``folder`` (created), through ``SummaryWriter``.

    Raises:
        ImportError: ``tensorboard`` is not installed (``pip install tensorboard``).
    """

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises it naming tensorboard when the package is absent
            raise ImportError("--report-to tensorboard needs tensorboard: pip install tensorboard") from e
        self._writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Add each ``tag: value`` at ``step`` (non-finite values too: TensorBoard shows them as gaps)."""
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """Add a float ``[3, H, W]`` image in ``[0, 1]`` at ``step``."""
        self._writer.add_image(tag, image.clamp(0, 1), step, dataformats="CHW")

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def make_tracker(report_to: str, output: Path) -> Tracker | None:
    """The tracker of ``report_to`` (:data:`REPORT_TO`) writing under ``output``; ``None`` for ``"none"``.

    Raises:
        ValueError: Another value.
        ImportError: As :class:`TensorBoardTracker`.
    """
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        return TensorBoardTracker(output / TENSORBOARD_DIR)
    raise ValueError(f"report_to must be one of {REPORT_TO}, got {report_to!r}")
