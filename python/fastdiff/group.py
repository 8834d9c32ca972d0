"""``fastdiff.DatasetGroup``: several datasets, each its own :class:`fastdiff.DataLoader` (own resolution,
buckets and batch size), their batches interleaved as kohya-ss sd-scripts interleaves the ``[[datasets]]``
of a dataset config; or one dataset at several resolutions (:meth:`DatasetGroup.at_resolutions`).

kohya's ``DatasetGroup`` is a ``torch.utils.data.ConcatDataset`` of datasets whose items are whole
batches, read by a ``torch.utils.data.DataLoader(shuffle=True)``: an epoch is every batch of every dataset
in a uniformly random order (without shuffling, dataset after dataset). Here each loader plans its own
epoch (its batch order shuffled with its seed) and this module only decides which loader each step
takes its next batch from: a seeded permutation of the steps, a pure function of (``seed``, epoch). So
an epoch is as reproducible, and as exactly resumable mid-way, as one loader's. Batches are not
touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fastdiff.dataset import load_datasets
from fastdiff.loader import DataLoader
from fastdiff.options import LOADER
from fastdiff.types import Batch, Report

#: Mixed into the seed of the step order, so it never equals a stream of the loaders' own seeds.
_ORDER_STREAM = 0x6B6F_6879_615F_6D69


class DatasetGroup:
    """Batches of several :class:`fastdiff.DataLoader` s, one after another in a seeded random order.

    Args:
        loaders: The datasets' loaders (at least one); each keeps its own resolution, buckets, batch
            size, shuffle, crops and caption operations. With several ranks, each loader splits its own
            batches (give every one the same ``rank`` / ``world_size``).
        seed: Seed of the step order (≥ 0, < 2**64).
        shuffle: Interleave the loaders' batches in a random order per epoch (kohya's); ``False``:
            every batch of the first loader, then of the second, ...

    The epoch ``e`` order: the list holding loader ``k``'s index ``len(loaders[k])`` times, in loader
    order, permuted by ``numpy.random.default_rng([seed, e, stream]).permutation`` when ``shuffle``;
    step ``i`` takes the next batch of loader ``order[i]``. Every step is one batch of one dataset, so
    batch sizes and shapes may change from step to step.

    Raises:
        ValueError: ``loaders`` is empty, or ``seed`` is out of range.
    """

    def __init__(self, loaders: Sequence[DataLoader], *, seed: int = 0, shuffle: bool = True) -> None:
        if not loaders:
            raise ValueError("loaders must hold at least one DataLoader")
        problem = LOADER["seed"].problem(seed) or LOADER["shuffle"].problem(shuffle)
        if problem is not None:
            raise ValueError(problem)
        self.loaders = list(loaders)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self._epoch, self._resume_batch = 0, 0
        self._position: tuple[int, int] | None = None

    @classmethod
    def from_config(
        cls, config: str | os.PathLike[str] | Mapping[str, Any], **overrides: Any
    ) -> DatasetGroup:
        """One loader per ``[[datasets]]`` of a dataset config (see :func:`fastdiff.load_datasets`).

        Args:
            config: Path of the TOML file, or its content as a dict.
            **overrides: Further :class:`fastdiff.DataLoader` keyword arguments for every loader; they
                win over the config's.

        The step order's ``seed`` and ``shuffle`` are the first dataset's (``[general]`` sets both for
        all).

        Raises:
            ValueError: The config is invalid (the message names the key and table), or as the
                :class:`fastdiff.DataLoader` constructor.
        """
        datasets = [({**kwargs, **overrides}, subsets) for kwargs, subsets in load_datasets(config)]
        first = datasets[0][0]
        return cls(
            [DataLoader(subsets=subsets, **kwargs) for kwargs, subsets in datasets],
            seed=first.get("seed", LOADER["seed"].default),
            shuffle=first.get("shuffle", LOADER["shuffle"].default),
        )

    @classmethod
    def at_resolutions(
        cls, loader: DataLoader, resolutions: Sequence[int], *, seed: int = 0, shuffle: bool = True
    ) -> DatasetGroup:
        """Multi-resolution training: ``loader``'s images at each of ``resolutions`` (px, distinct), every
        image once per resolution per epoch (times its repeats, as in one loader), the resolutions' batches
        interleaved in the seeded step order above. Each resolution's loader is
        :meth:`fastdiff.DataLoader.at_resolution` of the one scan (no file is read again), with its own
        buckets and plan; ``len`` is the sum of theirs, and a resumed epoch continues exactly.

        Raises:
            ValueError: ``resolutions`` is empty, repeats a value, or holds one out of range; or as
                :meth:`fastdiff.DataLoader.at_resolution`.
        """
        if not resolutions or len(set(resolutions)) != len(resolutions):
            raise ValueError(f"resolutions must be distinct and at least one, got {list(resolutions)}")
        return cls([loader.at_resolution(r) for r in resolutions], seed=seed, shuffle=shuffle)

    def order(self, epoch: int) -> list[int]:
        """The loader each step of ``epoch`` takes its batch from (``len(self)`` indices)."""
        order = np.repeat(np.arange(len(self.loaders)), [len(loader) for loader in self.loaders])
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, _ORDER_STREAM]).permutation(order)
        return [int(k) for k in order]

    def __len__(self) -> int:
        """Batches (steps) per epoch: the sum of the loaders'."""
        return sum(len(loader) for loader in self.loaders)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will run."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` (≥ 0) for the next iteration, in every loader too."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._resume_batch = 0
        self._epoch, self._position = epoch, None
        for loader in self.loaders:
            loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._epoch, self._resume_batch
        self._epoch, self._resume_batch = epoch + 1, 0
        self._position = (epoch, start)
        for loader in self.loaders:
            loader.set_epoch(epoch)
        return self._steps(epoch, start)

    def _steps(self, epoch: int, start: int) -> Iterator[Batch]:
        iterators: dict[int, Iterator[Batch]] = {}
        order = self.order(epoch)
        for step in range(start, len(order)):
            k = order[step]
            if k not in iterators:
                iterators[k] = iter(self.loaders[k])
            batch = next(iterators[k], None)
            self._position = (epoch, step + 1)
            if batch is not None:
                yield batch
        self._position = None

    def state_dict(self) -> dict[str, Any]:
        """Where the group is: ``epoch``, ``batches_consumed`` and ``num_batches`` as
        :meth:`fastdiff.DataLoader.state_dict` has them, ``seed``, ``shuffle``, and ``loaders``: each
        loader's own ``state_dict()`` (which checks its data and options on resume)."""
        epoch, consumed = self._position if self._position is not None else (self._epoch, self._resume_batch)
        if consumed >= len(self):
            epoch, consumed = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches_consumed": consumed,
            "num_batches": len(self),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "loaders": [loader.state_dict() for loader in self.loaders],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a group of the same datasets and options):
        the next iteration runs the saved epoch from its first unconsumed step, each loader from its
        first unconsumed batch of that epoch.

        Raises:
            ValueError: A key is missing, the number of loaders, ``seed`` or ``shuffle`` differ, or a
                loader's state does not fit it (as :meth:`fastdiff.DataLoader.load_state_dict`).
        """
        missing = {"epoch", "batches_consumed", "seed", "shuffle", "loaders"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        for name, here in (("seed", self.seed), ("shuffle", self.shuffle), ("loaders", len(self.loaders))):
            saved = len(state[name]) if name == "loaders" else state[name]
            if saved != here:
                raise ValueError(
                    f"state_dict was saved with {name}={saved!r}, this group has {name}={here!r}"
                )
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if epoch < 0 or not 0 <= consumed <= len(self):
            raise ValueError(f"state_dict has epoch={epoch}, batches_consumed={consumed} (of {len(self)})")
        done = np.bincount(
            np.asarray(self.order(epoch)[:consumed], dtype=np.int64), minlength=len(self.loaders)
        )
        for loader, saved, n in zip(self.loaders, state["loaders"], done, strict=True):
            loader.load_state_dict({**saved, "epoch": epoch, "batches_consumed": int(n)})
        self._epoch, self._resume_batch, self._position = epoch, consumed, None

    @property
    def captions(self) -> list[str]:
        """Every loader's :attr:`fastdiff.DataLoader.captions`, loader after loader."""
        return [c for loader in self.loaders for c in loader.captions]

    @property
    def report(self) -> list[Report]:
        """Each loader's :attr:`fastdiff.DataLoader.report`, in loader order."""
        return [loader.report for loader in self.loaders]
