"""Flow-matching DiT pipelines (SD3/3.5, FLUX.1, Z-Image) from local folders: which family a folder
holds, its components' configs without their weights, and the pipeline with some components left out.

Nothing here downloads: every ``from_pretrained`` passes ``local_files_only=True``. Single-file
checkpoints of these families are not supported (convert them to a diffusers folder first).
diffusers (the ``train`` extra) is imported where used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastdiff.training.families import FAMILIES, Family

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def dit_family(model: Path) -> Family | None:
    """The :class:`~fastdiff.training.families.Family` of a pipeline folder, by its
    ``model_index.json``'s ``_class_name``; ``None`` for anything else (a Stable Diffusion folder or
    file, a missing path: :mod:`fastdiff.training.sd_pipeline` reports those)."""
    index = model / "model_index.json"
    if not index.is_file():
        return None
    family: Family | None = FAMILIES.get(json.loads(index.read_text(encoding="utf-8")).get("_class_name"))
    return family


def check_components(model: Path, family: Family, *, without: Iterable[str] = ()) -> None:
    """Check that the folder has every component its ``model_index.json`` names, but ``without``'s
    (components the run does not load, such as SD3's T5 with ``t5`` off).

    Raises:
        ValueError: A component folder is missing; the message names them.
    """
    index = json.loads((model / "model_index.json").read_text(encoding="utf-8"))
    named = [
        k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
    ]
    missing = [name for name in named if name not in without and not (model / name).is_dir()]
    if missing:
        raise ValueError(
            f"model {model}: {family.pipeline} folder lacks {', '.join(f'{m}/' for m in missing)}"
        )


def component_config(model: Path, name: str) -> dict[str, Any]:
    """The ``config.json`` of component ``name`` (the scheduler's ``scheduler_config.json``), read
    without loading weights.

    Raises:
        FileNotFoundError: The component has no config file.
    """
    path = model / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def vae_downscale(model: Path) -> int:
    """The VAE's downsampling factor, ``2 ** (len(block_out_channels) - 1)`` (8 for every family's VAE)."""
    return int(2 ** (len(component_config(model, "vae")["block_out_channels"]) - 1))


def load_pipeline(model: Path, *, without: Iterable[str] = ()) -> DiffusionPipeline:
    """The family's pipeline from ``model`` (float32, CPU), components in ``without`` left ``None``
    (their weights are never read)."""
    from diffusers import DiffusionPipeline

    pipeline: DiffusionPipeline = DiffusionPipeline.from_pretrained(
        model, local_files_only=True, **dict.fromkeys(without)
    )
    return pipeline


def load_component(model: Path, name: str) -> Any:
    """One component (``"vae"``, ``"text_encoder_3"``, ...) alone, with the class ``model_index.json``
    names for it, on the CPU in float32."""
    import importlib

    library, class_name = json.loads((model / "model_index.json").read_text(encoding="utf-8"))[name]
    cls = getattr(importlib.import_module(library), class_name)
    return cls.from_pretrained(model, subfolder=name, local_files_only=True)
