"""The latent/text cache for the flow-matching DiT families (SD3, FLUX.1, Z-Image) on tiny local
pipelines (nothing downloads): cached latents are the family's normalised ``vae.encode`` and cached text
its ``encode_prompt``, bitwise at fp32; the text salt follows what changes the embeddings; a run from a
built cache never constructs the VAE or a text encoder and takes the losses of the uncached run."""

from __future__ import annotations

import functools
import importlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import fastdiff
import pytest
import torch
from conftest import copy_with_captions, smallest_images, tiny_run
from diffusers import AutoencoderKL
from fastdiff import cli
from fastdiff.cache.command import build_for_config
from fastdiff.cache.encoders import LatentEncoder, TextEncoder
from fastdiff.cache.manifest import read_manifest
from fastdiff.training.config import TrainConfig
from fastdiff.training.dit import DiTTask
from fastdiff.training.dit_pipeline import dit_family, load_pipeline
from fastdiff.training.run import train
from tiny_dit import LATENT_CHANNELS, SEQUENCE_TOKENS, build_flux, build_sd3, build_z_image
from tiny_sd import MAX_TOKENS

CPU = torch.device("cpu")
BUILDERS: dict[str, Callable[[Path], Path]] = {"sd3": build_sd3, "flux": build_flux, "z_image": build_z_image}
FAMILIES = tuple(BUILDERS)
CAPTIONS = ["fox", "", "a long caption that the tokenizers cut at their maximum length, twice over"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def images(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4 smallest wallpapers and their captions."""
    return copy_with_captions(smallest_images(wallpapers, 4), tmp_path_factory.mktemp("images"))


def config(model: Path, data: Path, output: Path, **overrides: object) -> TrainConfig:
    """3 CPU LoRA steps at resolution 32, batches of 2, half the captions dropped."""
    return tiny_run(
        model,
        data,
        output,
        **{
            "max_steps": 3,
            "learning_rate": 1e-3,
            "lora_rank": 4,
            "caption_dropout": 0.5,
            "max_sequence_length": SEQUENCE_TOKENS,
            **overrides,
        },
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_latents_are_the_familys_normalised_vae_encode_bitwise(
    name: str, pipelines: dict[str, Path], images: Path
) -> None:
    model = pipelines[name]
    loader = fastdiff.DataLoader(
        images, resolution=32, bucket_step=8, batch_size=2, num_threads=1, dtype=torch.float32
    )
    pixels = next(iter(loader))["pixel_values"]
    encoder = LatentEncoder.load(model, None, "f32", CPU)
    out = encoder.encode(pixels)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", local_files_only=True)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert shift != 0 and scale != 1
    assert torch.equal(out["latents"], (dist.mean - shift) * scale)
    assert torch.equal(out["latents_std"], dist.std * scale)
    b, _, h, w = pixels.shape
    assert out["latents"].shape == (b, LATENT_CHANNELS, h // 2, w // 2)  # unpacked, [C, h, w] per sample
    assert encoder.spec["vae"]["shift_factor"] == shift and encoder.spec["channels"] == LATENT_CHANNELS


def encode_prompt(pipe: Any, name: str, captions: list[str]) -> dict[str, Any]:
    """The family's pipeline's own ``encode_prompt`` of ``captions``, as sampling calls it."""
    with torch.no_grad():
        if name == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=captions,
                prompt_2=None,
                prompt_3=None,
                do_classifier_free_guidance=False,
                max_sequence_length=SEQUENCE_TOKENS,
            )
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if name == "flux":
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=captions, prompt_2=None, max_sequence_length=SEQUENCE_TOKENS
            )
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        embeds, _ = pipe.encode_prompt(
            prompt=captions, do_classifier_free_guidance=False, max_sequence_length=SEQUENCE_TOKENS
        )
        return {"cap_feats": embeds}


@pytest.mark.parametrize("name", FAMILIES)
def test_text_entries_are_the_pipelines_encode_prompt_bitwise(name: str, pipelines: dict[str, Path]) -> None:
    model = pipelines[name]
    encoder = TextEncoder.load(model, None, "f32", CPU, max_sequence_length=SEQUENCE_TOKENS)
    out = encoder.encode(CAPTIONS)
    expected = encode_prompt(load_pipeline(model), name, CAPTIONS)
    tensors = encoder.spec["tensors"]
    assert {k: list(v.shape[1:]) for k, v in out.items()} == tensors
    if name == "z_image":
        # Unpadded [L_i, D] per caption, of different lengths: padded to max_sequence_length + a mask.
        lengths = [len(f) for f in expected["cap_feats"]]
        assert len(set(lengths)) == 3 and max(lengths) <= SEQUENCE_TOKENS
        assert set(tensors) == {"prompt_embeds", "prompt_attention_mask"}
        assert tensors["prompt_embeds"][0] == SEQUENCE_TOKENS
        assert out["prompt_attention_mask"].sum(1).tolist() == lengths
        for embeds, feats in zip(out["prompt_embeds"], expected["cap_feats"], strict=True):
            assert torch.equal(embeds[: len(feats)], feats) and not embeds[len(feats) :].any()
        family = dit_family(model)
        assert family is not None
        back = family.from_entries(out)["cap_feats"]
        assert all(torch.equal(a, b) for a, b in zip(back, expected["cap_feats"], strict=True))
    else:
        assert set(out) == set(expected) == set(tensors)
        assert all(torch.equal(out[k], expected[k]) for k in expected)
        # SD3: the CLIPs' tokens then T5's; FLUX.1: T5's alone.
        assert tensors["prompt_embeds"][0] == SEQUENCE_TOKENS + (MAX_TOKENS if name == "sd3" else 0)


def test_text_salt_follows_the_sequence_length_t5_and_the_encoders(
    pipelines: dict[str, Path], tmp_path: Path
) -> None:
    sd3 = pipelines["sd3"]

    def spec(model: Path = sd3, **options: Any) -> dict[str, Any]:
        return dict(TextEncoder.load(model, None, "f32", CPU, **options).spec)

    base = spec(max_sequence_length=SEQUENCE_TOKENS)
    recorded = {"family": "sd3", "t5": True, "max_length": SEQUENCE_TOKENS}
    assert base["encoders"] == {**base["encoders"], **recorded}
    shorter = spec(max_sequence_length=SEQUENCE_TOKENS // 2)
    no_t5 = spec(max_sequence_length=SEQUENCE_TOKENS, t5=False)
    assert len({base["salt"], shorter["salt"], no_t5["salt"]}) == 3
    # The default is the family's (256 for SD3), and T5's config is in the salt (unless T5 is off).
    assert spec()["encoders"]["max_length"] == 256
    model = tmp_path / "sd3"
    shutil.copytree(sd3, model)
    path = model / "text_encoder_3" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layer_norm_epsilon": 1e-3}))
    assert spec(model, max_sequence_length=SEQUENCE_TOKENS)["salt"] != base["salt"]
    assert spec(model, max_sequence_length=SEQUENCE_TOKENS, t5=False)["salt"] == no_t5["salt"]


def count_constructions(model: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count constructions of the classes ``model_index.json`` names for the VAE, the transformer and
    the text encoders, by component (outermost only)."""
    index = json.loads((model / "model_index.json").read_text())
    built: dict[str, int] = {}
    depth = [0]
    names = [n for n in index if n in ("vae", "transformer") or n.startswith("text_encoder")]
    for name in names:
        library, class_name = index[name]
        cls = getattr(importlib.import_module(library), class_name)

        def counting(cls: type, name: str) -> Callable[..., None]:
            original = cls.__init__

            @functools.wraps(original)  # diffusers reads the config's keys from the signature
            def init(self: object, *args: object, **kwargs: object) -> None:
                if type(self) is cls and depth[0] == 0:
                    built[name] = built.get(name, 0) + 1
                depth[0] += 1
                try:
                    original(self, *args, **kwargs)
                finally:
                    depth[0] -= 1

            return init

        monkeypatch.setattr(cls, "__init__", counting(cls, name))
    return built


@pytest.mark.parametrize("name", FAMILIES)
def test_a_run_from_the_cache_takes_the_uncached_losses_without_the_vae_or_text_encoders(
    name: str, pipelines: dict[str, Path], images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = pipelines[name]
    uncached = train(config(model, images, tmp_path / "uncached"))
    cache = tmp_path / "cache"
    report = build_for_config(config(model, images, tmp_path, cache=cache), dtype="f32", progress=False)
    manifest = read_manifest(cache)
    assert manifest is not None and manifest["kind"] == dit_family(model).name  # type: ignore[union-attr]
    assert report.latents_encoded == report.latents_needed > 0 and report.text_encoded == report.text_needed
    built = count_constructions(model, monkeypatch)
    cached = train(config(model, images, tmp_path / "cached", cache=cache))
    assert built == {"transformer": 1}
    assert len(cached.losses) == 3 and all(math.isfinite(v) for v in cached.losses)
    # Equal up to float rounding (measured: relative 1e-7 at most): the cache scales the posterior's
    # mean and std apart, where the VAE scales its draw; the draws (eps, noise, t, dropped captions,
    # here [F, F], [T, T], [F, T]) are the same, and a dropped caption takes the cached "".
    torch.testing.assert_close(cached.losses, uncached.losses, rtol=1e-6, atol=0)


def test_fastdiff_cache_takes_the_text_flags_and_train_cache_build_previews_and_saves(
    pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    sd3, cache = pipelines["sd3"], tmp_path / "cache"
    argv = ["cache", "--model", str(sd3), "--data", str(images), "--output", str(cache)]
    flags = ["--resolution", "32", "--bucket-step", "8", "--num-threads", "1", "--device", "cpu"]
    assert cli.main([*argv, *flags, "--max-sequence-length", "8", "--no-t5", "--dtype", "f32"]) == 0
    manifest = read_manifest(cache)
    assert manifest is not None and manifest["kind"] == "sd3"
    assert manifest["text"]["encoders"]["t5"] is False and manifest["text"]["encoders"]["max_length"] == 8
    assert manifest["text"]["tensors"]["prompt_embeds"][0] == MAX_TOKENS + 8
    assert manifest["latents"]["channels"] == LATENT_CHANNELS
    # A full fine-tune from the cache (--cache-build adds nothing here): previews load the VAE and the
    # text encoders for the preview, and the save puts them into the saved pipeline.
    run = config(sd3, images, tmp_path / "out", cache=cache, cache_build=True, lora_rank=0)
    run = replace(
        run,
        t5=False,
        max_sequence_length=8,
        max_steps=2,
        preview_every=2,
        preview_steps=2,
        preview_prompts=("a fox",),
    )
    result = train(run)
    assert all(math.isfinite(v) for v in result.losses)
    assert list((tmp_path / "out" / "previews").glob("step-000002-*x*.png"))  # a grid per size
    saved = load_pipeline(tmp_path / "out")
    assert saved.vae is not None and saved.text_encoder_2 is not None and saved.text_encoder_3 is not None


@pytest.mark.parametrize("name", FAMILIES)
def test_a_cached_tasks_preview_loads_the_components_for_it_and_equals_the_uncached_one(
    name: str, pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    model = pipelines[name]
    family = dit_family(model)
    assert family is not None
    cfg = config(model, images, tmp_path)
    empty = TextEncoder.load(model, None, "f32", CPU, max_sequence_length=SEQUENCE_TOKENS).encode([""])
    task = DiTTask.from_config(
        cfg, CPU, family, cached={"latents", "text"}, empty_entry=lambda: {k: v[0] for k, v in empty.items()}
    )
    assert task.cached == {"latents", "text"} and task.vae is None and task.text_encoders == []
    preview = task.preview(["a fox"], seeds=[0], steps=2, width=32, height=32)
    assert task.pipeline.vae is None and task.pipeline.text_encoder is None  # dropped again
    reference = DiTTask.from_config(cfg, CPU, family).preview(
        ["a fox"], seeds=[0], steps=2, width=32, height=32
    )
    assert preview.shape == (1, 3, 32, 32) and torch.equal(preview, reference)
    with pytest.raises(ValueError, match="embeddings of ''"):
        DiTTask.from_config(cfg, CPU, family, cached={"text"})
