"""Where a run's figures go besides its CSV and PNG files: TensorBoard event files and Weights & Biases
offline runs (``--report-to tensorboard``, ``wandb``, or both: ``tensorboard,wandb``).

:class:`TensorBoardTracker` writes through torch's ``torch.utils.tensorboard.SummaryWriter`` (which
needs the ``tensorboard`` package, in the ``train`` extra) into ``OUTPUT/tensorboard/``; read it with
``tensorboard --logdir OUTPUT/tensorboard``. :class:`WandbTracker` writes a wandb run in wandb's offline
mode (nothing leaves the machine; the ``wandb`` package, in the ``wandb`` extra) under
``OUTPUT/wandb/offline-run-*``; upload it later with ``wandb sync OUTPUT/wandb/offline-run-*``. Both
get the same tags: ``train/loss``, ``train/grad_norm``, ``train/lr``, ``train/skipped_steps`` (the
run's count so far), ``train/data_wait_share`` (the part of the loop's wall time so far spent waiting
for batches, 0-1), ``val/loss`` and the preview grids as ``previews/WxH``, one per preview size
(``[3, H, W]`` images in ``[0, 1]``; 8-bit RGB images in wandb).

It must not know about the models, the loader or the settings beyond the folder and their JSON values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

#: Trackers of ``--report-to`` (a comma-separated list of them, or ``none``).
REPORT_TO = ("none", "tensorboard", "wandb")
#: The folder under the run's output that TensorBoard's event files go to.
TENSORBOARD_DIR = "tensorboard"
#: The wandb project of the offline runs.
WANDB_PROJECT = "fastdiff"


def parse_report_to(value: str) -> list[str]:
    """The trackers named by a ``--report-to`` value: ``"tensorboard,wandb"`` → both, ``"none"`` → none.

    Raises:
        ValueError: A name is not one of :data:`REPORT_TO`, or ``none`` is listed with others.
    """
    names = [name.strip() for name in value.split(",")]
    unknown = [name for name in names if name not in REPORT_TO]
    if unknown or ("none" in names and len(names) > 1):
        raise ValueError(
            f"report_to must be none or a comma-separated list of {', '.join(REPORT_TO[1:])}, got {value!r}"
        )
    return [] if names == ["none"] else list(dict.fromkeys(names))


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


class WandbTracker:
    """A Weights & Biases run in offline mode (``wandb.init(mode="offline")``, whatever ``WANDB_MODE``
    says) under ``folder/wandb/``, named after ``folder``, with ``settings`` as its config; system
    metrics sampling and console capture off.

    Raises:
        ImportError: ``wandb`` is not installed (``pip install wandb``).
    """

    def __init__(self, folder: Path, settings: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("--report-to wandb needs wandb: pip install wandb") from e
        self._wandb = wandb
        folder.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            dir=str(folder),
            project=WANDB_PROJECT,
            name=folder.name,
            mode="offline",
            config=dict(settings),
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log each ``tag: value`` at ``step`` (several calls at one step add to the same history row)."""
        self._run.log(dict(values), step=step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """Log a float ``[3, H, W]`` image in ``[0, 1]`` at ``step``, as 8-bit RGB."""
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        self._run.log({tag: self._wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """Several trackers as one: each call goes to each, in order."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tracker in self.trackers:
            tracker.scalars(step, values)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        for tracker in self.trackers:
            tracker.image(step, tag, image)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def make_tracker(report_to: str, output: Path, settings: Mapping[str, Any]) -> Tracker | None:
    """The trackers of ``report_to`` (see :func:`parse_report_to`) writing under ``output``, as one;
    ``None`` for ``"none"``.

    Args:
        report_to: ``"none"``, a name of :data:`REPORT_TO` or a comma-separated list of them.
        output: The run's output folder.
        settings: The run's settings as JSON values (the wandb run's config).

    Raises:
        ValueError: As :func:`parse_report_to`.
        ImportError: As :class:`TensorBoardTracker` and :class:`WandbTracker`.
    """
    trackers: list[Tracker] = []
    for name in parse_report_to(report_to):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(output / TENSORBOARD_DIR))
        else:
            trackers.append(WandbTracker(output, settings))
    if not trackers:
        return None
    return trackers[0] if len(trackers) == 1 else Trackers(trackers)
