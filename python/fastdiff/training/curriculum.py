"""A coarse-to-fine resolution curriculum (``--resolution-schedule 256:2000,512``): the run's loader at one
resolution per stage, re-bucketed between epochs from the one scan
(:meth:`fastdiff.DataLoader.at_resolution`), as Stable Diffusion was trained at 256 px before 512
(Rombach et al. 2022, the SD v1 model card).

It only decides which stage's loader yields the next epoch and saves the stage with the loader's position;
the batches are the stage loader's own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from fastdiff.loader import DataLoader
from fastdiff.types import Batch

log = logging.getLogger("fastdiff.train")


def parse_schedule(text: str) -> list[tuple[int, int | None]]:
    """``"256:2000,512"`` as ``[(256, 2000), (512, None)]``: each stage's resolution (px) and the step
    its successor takes over from (``None`` for the last stage, which runs to the end).

    Raises:
        ValueError: A stage is not ``RES:STEP`` (or a last ``RES``), a number is not a positive integer,
            the steps do not increase, or the last stage has a step (the message quotes it).
    """
    stages: list[tuple[int, int | None]] = []
    parts = [p.strip() for p in text.split(",")]
    for i, part in enumerate(parts):
        resolution, sep, until = part.partition(":")
        last = i == len(parts) - 1
        ok = resolution.isdigit() and int(resolution) > 0 and (until.isdigit() if not last else not sep)
        after = stages[-1][1] or 0 if stages else 0
        if not ok or (not last and int(until) <= after):
            raise ValueError(
                f"resolution_schedule must be RES:STEP,...,RES with positive integers and increasing steps "
                f"(256:2000,512), got {text!r} (stage {part!r})"
            )
        stages.append((int(resolution), None if last else int(until)))
    return stages


class ResolutionCurriculum:
    """The run's batches under a resolution schedule: stage ``k``'s loader is ``loader.at_resolution(r_k)``
    (built once, sharing ``loader``'s scan), and a stage ends at the first epoch boundary at or after its
    step: :meth:`advance` is called with the step count before each epoch starts, and the next epoch is
    the next stage's when that count has reached the step. Epochs are numbered on across stages (the
    epoch keys the shuffle, crops and flips as usual).

    :meth:`state_dict` is the stage loader's with ``resolution_stage`` added; :meth:`load_state_dict` picks
    that stage and resumes its loader mid-epoch exactly. A run resumed mid-epoch does not switch stage
    before that epoch ends (the uninterrupted run could not have either).

    Args:
        loader: The run's loader (any resolution: each stage re-buckets its scan).
        schedule: :func:`parse_schedule`'s stages.
    """

    def __init__(self, loader: DataLoader, schedule: list[tuple[int, int | None]]) -> None:
        self.schedule = schedule
        self._base = loader
        self._loaders: dict[int, DataLoader] = {}
        self._stage = 0
        self._mid_epoch = False  # set by load_state_dict: the next epoch is the rest of a started one

    @property
    def stage(self) -> int:
        """Index into ``schedule`` of the stage the next epoch runs in."""
        return self._stage

    @property
    def loader(self) -> DataLoader:
        """The current stage's loader."""
        return self._at(self._stage)

    def _at(self, stage: int) -> DataLoader:
        if stage not in self._loaders:
            self._loaders[stage] = self._base.at_resolution(self.schedule[stage][0])
        return self._loaders[stage]

    def advance(self, step: int) -> bool:
        """Called before each epoch with the optimizer steps done: move to the stage that ``step`` is in
        (never back), unless the epoch is the rest of a resumed one. Returns whether the stage changed
        (the change is logged, with the step and both resolutions)."""
        if self._mid_epoch:
            self._mid_epoch = False
            return False
        stage = self._stage
        while (until := self.schedule[stage][1]) is not None and step >= until:
            stage += 1
        if stage == self._stage:
            return False
        epoch = self.loader.epoch
        log.info(
            "resolution schedule: step %d, epoch %d: resolution %d -> %d (stage %d of %d)",
            step,
            epoch,
            self.schedule[self._stage][0],
            self.schedule[stage][0],
            stage + 1,
            len(self.schedule),
        )
        self._stage = stage
        self.loader.set_epoch(epoch)
        return True

    @property
    def resolution(self) -> int:
        """The current stage's resolution in px."""
        return self.schedule[self._stage][0]

    @property
    def epoch(self) -> int:
        """The epoch the next iteration runs."""
        return self.loader.epoch

    @property
    def captions(self) -> list[str]:
        """Every image's caption as scanned (:attr:`fastdiff.DataLoader.captions`)."""
        return self._base.captions

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration, in the current stage."""
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches per epoch of the current stage."""
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        self._mid_epoch = False
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        """The current stage loader's :meth:`fastdiff.DataLoader.state_dict` plus ``resolution_stage``
        (its index) and ``resolution_schedule`` (every stage as ``[resolution, step or None]``)."""
        stages = [[r, until] for r, until in self.schedule]
        return {**self.loader.state_dict(), "resolution_stage": self._stage, "resolution_schedule": stages}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume in the saved stage at the saved position.

        Raises:
            ValueError: The state has no ``resolution_stage`` or another schedule, or as
                :meth:`fastdiff.DataLoader.load_state_dict`.
        """
        stages = [[r, until] for r, until in self.schedule]
        if "resolution_stage" not in state or state.get("resolution_schedule") != stages:
            raise ValueError(
                f"the checkpoint's loader state was saved with resolution_schedule "
                f"{state.get('resolution_schedule')!r}, this run has {stages!r}"
            )
        stage = int(state["resolution_stage"])
        if not 0 <= stage < len(self.schedule):
            raise ValueError(f"resolution_stage {stage} is not a stage of {stages!r}")
        rest = {k: v for k, v in state.items() if k not in ("resolution_stage", "resolution_schedule")}
        self._at(stage).load_state_dict(rest)
        self._stage = stage
        segments = rest.get("segments", [])
        self._mid_epoch = int(rest["batches_consumed"]) > 0 or len(segments) > 1
