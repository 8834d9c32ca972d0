"""Checkpoint folders ``OUTPUT/checkpoint-STEP/`` and every random state a step reads, so that
``--resume`` continues bit-exactly.

A checkpoint holds the trainable parameters (``trainable.safetensors``), the optimizer, LR scheduler,
EMA, GradScaler, counters and RNG states (``training_state.pt``), the loader's position
(``loader.json``) and the run's settings (``train_config.json``), plus any files the task adds. It must
not know what the settings mean beyond the names it is told must match.

safetensors (the ``train`` extra) is imported where used: ``fastdiff.cli`` imports the training modules
to register their arguments, and must start fast and report a missing extra itself.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdiff.training.distributed import copy_full
from fastdiff.training.protocols import BatchLoader, Task

#: Files of a checkpoint folder ``OUTPUT/checkpoint-STEP/``.
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "training_state.pt"
LOADER_FILE = "loader.json"
CONFIG_FILE = "train_config.json"


def rng_state(noise: torch.Generator, captions: random.Random) -> dict[str, Any]:
    """Every random state a step reads: torch (CPU and CUDA), numpy, Python, the noise generator and the
    caption-dropout RNG, as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # only a non-MT19937 global generator gives the dict form
        raise TypeError("numpy's global RandomState is not MT19937; its state cannot be checkpointed")
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
        "noise": noise.get_state(),
        "captions": captions.getstate(),
    }


def set_rng_state(state: dict[str, Any], noise: torch.Generator, captions: random.Random) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(_as_tuple(state["python"]))
    noise.set_state(state["noise"])
    captions.setstate(_as_tuple(state["captions"]))


def _as_tuple(value: Any) -> Any:
    """Lists back to tuples, recursively (``random.setstate`` wants tuples)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint folder, else its ``checkpoint-STEP`` child of highest step.

    Raises:
        FileNotFoundError: Neither.
    """
    if (path / STATE_FILE).is_file():
        return path
    children = [p for p in path.glob("checkpoint-*") if (p / STATE_FILE).is_file()] if path.is_dir() else []
    numbered = [(int(p.name.split("-", 1)[1]), p) for p in children if p.name.split("-", 1)[1].isdigit()]
    if not numbered:
        raise FileNotFoundError(
            f"--resume {path}: not a checkpoint folder (no {STATE_FILE}) and holds no checkpoint-STEP folders"
        )
    return max(numbered)[1]


class Checkpointer:
    """Writes and reads the ``checkpoint-STEP`` folders of one run.

    Args:
        output: The run's output folder (checkpoints go in ``output/checkpoint-STEP``).
        settings: The run's settings as JSON values (saved as ``train_config.json``).
        must_match: Names of ``settings`` that a resumed run must share with the checkpoint.
        task: Whose ``trainable()`` parameters are saved and restored.
        loader: Whose ``state_dict()`` is saved and ``load_state_dict()`` restored.
    """

    def __init__(
        self,
        output: Path,
        settings: Mapping[str, Any],
        must_match: Sequence[str],
        task: Task,
        loader: BatchLoader,
    ) -> None:
        self.output, self.settings, self.must_match = output, dict(settings), tuple(must_match)
        self.task, self.loader = task, loader

    def save(self, step: int, objects: dict[str, Any], extra_files: Callable[[Path], None] | None) -> Path:
        """Write ``checkpoint-STEP`` (``objects`` into ``training_state.pt``, then ``extra_files(folder)``),
        atomically: a run killed while saving leaves the previous folders only.

        Returns:
            The folder written.

        Raises:
            TypeError: The loader has no ``state_dict()``.
        """
        from safetensors.torch import save_file

        final = self.output / f"checkpoint-{step}"
        tmp = self.output / f".checkpoint-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {k: p.detach().cpu().contiguous() for k, p in self.task.trainable().items()}
        save_file(tensors, tmp / TRAINABLE_FILE)
        torch.save(objects, tmp / STATE_FILE)
        state_dict = getattr(self.loader, "state_dict", None)
        if state_dict is None:
            raise TypeError(
                f"checkpoints need a loader with state_dict(); {type(self.loader).__name__} has none"
            )
        (tmp / LOADER_FILE).write_text(json.dumps(state_dict(), indent=1) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(self.settings, indent=2) + "\n")
        if extra_files is not None:
            extra_files(tmp)
        # Rename last, so that a run killed while saving never leaves a partial checkpoint-STEP.
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore the trainable parameters and the loader's position from ``folder``.

        Returns:
            The ``objects`` that :meth:`save` wrote (on the CPU).

        Raises:
            ValueError: A ``must_match`` setting or the set of trainable weights differs.
            TypeError: The loader has no ``load_state_dict()``.
        """
        from safetensors.torch import load_file

        saved = json.loads((folder / CONFIG_FILE).read_text())
        here = json.loads(json.dumps(self.settings))
        for name in self.must_match:
            if saved.get(name) != here.get(name):
                raise ValueError(
                    f"--resume {folder}: the checkpoint was written with {name}={saved.get(name)!r}, "
                    f"this run has {name}={here.get(name)!r}"
                )
        tensors = load_file(folder / TRAINABLE_FILE)
        params = self.task.trainable()
        if tensors.keys() != params.keys():
            missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
            raise ValueError(
                f"--resume {folder}: trainable weights differ (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for name, param in params.items():
            copy_full(param, tensors[name])
        load_state_dict = getattr(self.loader, "load_state_dict", None)
        if load_state_dict is None:
            raise TypeError(f"--resume needs a loader with load_state_dict(); {type(self.loader).__name__}")
        load_state_dict(json.loads((folder / LOADER_FILE).read_text()))
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
