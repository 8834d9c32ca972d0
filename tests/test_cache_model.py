"""The model side of the latent/text cache on tiny local SD 1.x and SDXL pipelines (nothing downloads):
only the VAE or the text encoders load, entries equal the training path's encoders bitwise at fp32,
salts follow every file that changes an encoder's output, the manifest is written atomically, and a
training task fed cached tensors never constructs a VAE or a text encoder."""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import fastdiff
import pytest
import torch
from conftest import copy_with_captions, smallest_images, tiny_run
from diffusers import AutoencoderKL, StableDiffusionPipeline
from fastdiff import _fastdiff
from fastdiff.cache import digest, manifest
from fastdiff.cache.encoders import TORCH_DTYPES, LatentEncoder, TextEncoder, stored_dtype
from fastdiff.cache.entries import empty_prompt
from fastdiff.cache.shards import Shards
from fastdiff.training import run, sd, sd_pipeline
from fastdiff.training.config import TrainConfig
from fastdiff.training.protocols import TrainBatch
from tiny_sd import build_sd15, build_sdxl
from transformers import CLIPTextModel, CLIPTextModelWithProjection

CPU = torch.device("cpu")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def images(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4 smallest wallpapers and their captions."""
    return copy_with_captions(smallest_images(wallpapers, 4), tmp_path_factory.mktemp("images"))


def pixel_batch(images: Path) -> fastdiff.types.Batch:
    loader = fastdiff.DataLoader(
        images, resolution=32, bucket_step=8, batch_size=2, num_threads=1, dtype=torch.float32
    )
    return next(iter(loader))


def test_latents_are_the_scaled_posterior_mean_and_std_bitwise(sd15: Path, images: Path) -> None:
    batch = pixel_batch(images)
    encoder = LatentEncoder.load(sd15, None, "f32", CPU)
    out = encoder.encode(batch["pixel_values"])
    vae = AutoencoderKL.from_pretrained(sd15, subfolder="vae", local_files_only=True)
    # Frozen and without gradients, as the encoder runs: torch may pick other CPU kernels for weights
    # that need gradients (a last-bit difference).
    vae.requires_grad_(False)
    with torch.no_grad():
        dist = vae.encode(batch["pixel_values"]).latent_dist
    scale = vae.config.scaling_factor
    assert scale == 0.18215 and out["latents"].dtype == torch.float32
    assert torch.equal(out["latents"], dist.mean * scale)
    assert torch.equal(out["latents_std"], dist.std * scale)
    # The training draw from the cached posterior is the uncached draw up to rounding.
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    live = sd_pipeline.encode_latents(vae, batch["pixel_values"], torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["latents"] + out["latents_std"] * eps, live, rtol=1e-6, atol=1e-6)
    b, _, h, w = batch["pixel_values"].shape
    assert out["latents"].shape == (b, encoder.spec["channels"], h // 2, w // 2)
    assert encoder.spec["downscale"] == 2 and encoder.spec["vae"]["class"] == "AutoencoderKL"


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_text_entries_equal_the_pipeline_encoders_bitwise(kind: str, sd15: Path, sdxl: Path) -> None:
    model = sdxl if kind == "sdxl" else sd15
    captions = ["a red fox", "", "a very long caption that the tokenizer cuts at its maximum length"]
    encoder = TextEncoder.load(model, None, "f32", CPU)
    out = encoder.encode(captions)
    pipe = sd_pipeline.load_pipeline(model)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if kind == "sdxl" else [])
    with torch.no_grad():
        hidden, pooled = sd_pipeline.encode_prompts(encoders, tokenizers, captions, sdxl=kind == "sdxl")
    assert torch.equal(out["prompt_embeds"], hidden)
    tensors = encoder.spec["tensors"]
    assert (
        list(out["prompt_embeds"].shape[1:]) == tensors["prompt_embeds"] == [16, 64 if kind == "sdxl" else 32]
    )
    if kind == "sdxl":
        assert pooled is not None and torch.equal(out["pooled_prompt_embeds"], pooled)
        assert tensors["pooled_prompt_embeds"] == [32]
    else:
        assert set(out) == {"prompt_embeds"} and set(tensors) == {"prompt_embeds"}


def test_only_the_vae_or_only_the_text_encoders_are_constructed(
    sdxl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = count_constructions(monkeypatch)
    LatentEncoder.load(sdxl, None, "bf16", CPU)
    assert built == {"AutoencoderKL": 1}
    built.clear()
    TextEncoder.load(sdxl, None, "bf16", CPU)
    assert built == {"CLIPTextModel": 1, "CLIPTextModelWithProjection": 1}


def count_constructions(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the constructions of VAEs, text encoders and UNets by class name (outermost only: a
    ``CLIPTextModelWithProjection`` that builds a ``CLIPTextModel`` inside counts once)."""
    from diffusers import UNet2DConditionModel

    built: dict[str, int] = {}
    depth = [0]

    def counting(cls: type) -> Callable[..., None]:
        original = cls.__init__

        @functools.wraps(original)  # diffusers reads the config's keys from the signature
        def init(self: object, *args: object, **kwargs: object) -> None:
            if type(self) is cls and depth[0] == 0:
                built[cls.__name__] = built.get(cls.__name__, 0) + 1
            depth[0] += 1
            try:
                original(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return init

    for cls in (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel):
        monkeypatch.setattr(cls, "__init__", counting(cls))
    return built


def test_salts_follow_each_file_that_changes_an_encoder(sd15: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(sd15, model)
    latents = LatentEncoder.load(model, None, "f32", CPU).spec
    text = TextEncoder.load(model, None, "f32", CPU).spec
    assert len(latents["salt"]) == 32 and int(latents["salt"], 16) >= 0
    # Only the VAE's scaling_factor: the latents' salt changes, the text salt does not.
    config_path = model / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = 0.2
    config_path.write_text(json.dumps(config))
    assert LatentEncoder.load(model, None, "f32", CPU).spec["salt"] != latents["salt"]
    assert TextEncoder.load(model, None, "f32", CPU).spec["salt"] == text["salt"]
    # The storage dtype and the tokenizer's vocabulary are in their salts too.
    changed = LatentEncoder.load(model, None, "bf16", CPU).spec
    assert changed["salt"] not in {latents["salt"], LatentEncoder.load(model, None, "f32", CPU).spec["salt"]}
    with (model / "tokenizer" / "merges.txt").open("a") as f:
        f.write("a b\n")
    assert TextEncoder.load(model, None, "f32", CPU).spec["salt"] != text["salt"]
    # The salt is SHA-256 of the inputs' JSON, truncated to 16 bytes.
    assert (
        digest.salt({"b": 1, "a": [2]}) == __import__("hashlib").sha256(b'{"a":[2],"b":1}').hexdigest()[:32]
    )


def test_default_dtype_is_the_stored_vae_weights_dtype(sd15: Path, tmp_path: Path) -> None:
    assert stored_dtype(sd15) == "f32"
    model = tmp_path / "model"
    shutil.copytree(sd15, model)
    vae = AutoencoderKL.from_pretrained(sd15, subfolder="vae").to(torch.float16)
    vae.save_pretrained(model / "vae", safe_serialization=True)
    assert stored_dtype(model) == "f16"


def test_manifest_write_is_atomic_and_read_checks_the_format(tmp_path: Path) -> None:
    assert manifest.read_manifest(tmp_path) is None
    spec: manifest.LatentSpec = {
        "salt": "0" * 32,
        "dtype": "bf16",
        "channels": 4,
        "downscale": 8,
        "tensors": ["latents", "latents_std"],
        "vae": {
            "digest": "1" * 64,
            "scaling_factor": 0.13025,
            "shift_factor": None,
            "class": "AutoencoderKL",
        },
    }
    m = manifest.with_halves(None, latents=spec, text=None, model="m", kind="sdxl")
    path = manifest.write_manifest(tmp_path, m)
    assert [p.name for p in tmp_path.iterdir()] == [manifest.MANIFEST]  # no temporary file left
    read = manifest.read_manifest(tmp_path)
    assert (
        read == {**m, "format": "fastdiff-cache-1"}
        and json.loads(path.read_text())["latents"]["dtype"] == "bf16"
    )
    # A failure record stays while the latents' salt does; a new salt drops it with the old entries.
    read["failed"] = {"a" * 32: "decode: truncated"}
    same = manifest.with_halves(read, latents=spec, text=None, model="m", kind="sdxl")
    assert same["failed"] == {"a" * 32: "decode: truncated"}
    new = manifest.with_halves(read, latents={**spec, "salt": "2" * 32}, text=None, model="m", kind="sdxl")
    assert new["failed"] == {}
    path.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format 'other'"):
        manifest.read_manifest(tmp_path)
    path.write_text("{")
    with pytest.raises(ValueError, match="invalid JSON"):
        manifest.read_manifest(tmp_path)


def task_config(model: Path, data: Path, output: Path, **overrides: object) -> TrainConfig:
    return tiny_run(model, data, output, **{"max_steps": 2, "learning_rate": 1e-2, **overrides})


def cached_batch(model: Path, batch: fastdiff.types.Batch) -> TrainBatch:
    """``batch`` as a cache serves it: latents and embeddings instead of pixels (f32)."""
    latents = LatentEncoder.load(model, None, "f32", CPU).encode(batch["pixel_values"])
    text = TextEncoder.load(model, None, "f32", CPU).encode(batch["captions"])
    served = {k: v for k, v in batch.items() if k != "pixel_values"}
    return TrainBatch(**served, **latents, **text)  # type: ignore[typeddict-item]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_task_fed_cached_tensors_never_constructs_the_vae_or_text_encoders(
    kind: str, sd15: Path, sdxl: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = sdxl if kind == "sdxl" else sd15
    batch = pixel_batch(images)
    cached = cached_batch(model, batch)
    empty = TextEncoder.load(model, None, "f32", CPU).encode([""])
    empty_prompt = (empty["prompt_embeds"][0], empty["pooled_prompt_embeds"][0] if kind == "sdxl" else None)
    cfg = task_config(model, images, tmp_path)
    live = sd.PipelineTask.from_config(cfg, CPU)

    built = count_constructions(monkeypatch)
    task = sd.PipelineTask.from_config(
        cfg, CPU, cached={"latents", "text"}, empty_prompt=lambda: empty_prompt
    )
    assert built == {"UNet2DConditionModel": 1}
    assert task.vae is None and task.text_encoders == [] and task.cached == {"latents", "text"}
    assert task.pipeline.vae is None and task.pipeline.text_encoder is None
    assert task.config.resolution == 32 and set(task.trainable()) == set(live.trainable())

    dropped = [True, False]
    for flags in ([False, False], dropped):
        a = live.loss(
            TrainBatch(
                **{
                    **batch,
                    "captions": ["" if d else c for c, d in zip(batch["captions"], flags, strict=True)],
                },
                captions_dropped=flags,
            ),
            generator=torch.Generator().manual_seed(1),
            amp_dtype=None,
        )
        b = task.loss(
            TrainBatch(**cached, captions_dropped=flags),
            generator=torch.Generator().manual_seed(1),
            amp_dtype=None,
        )
        assert math.isfinite(a.item())
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert built == {"UNet2DConditionModel": 1}


def test_cached_previews_load_the_encoders_for_the_preview_only_and_a_full_save_is_complete(
    sd15: Path, images: Path, tmp_path: Path
) -> None:
    cfg = task_config(sd15, images, tmp_path, caption_dropout=0.0)
    task = sd.PipelineTask.from_config(cfg, CPU, cached={"latents", "text"})
    images_out = task.preview(["a fox"], seeds=[0], steps=2, width=32, height=32)
    assert images_out.shape == (1, 3, 32, 32) and images_out.min() >= 0 and images_out.max() <= 1
    assert task.pipeline.vae is None and task.pipeline.text_encoder is None
    reference = sd.PipelineTask.from_config(cfg, CPU).preview(
        ["a fox"], seeds=[0], steps=2, width=32, height=32
    )
    assert torch.equal(images_out, reference)
    task.save(tmp_path / "saved")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert pipe.vae is not None and pipe.text_encoder is not None


def test_cached_text_refuses_text_encoder_training_and_needs_the_empty_prompt(
    sd15: Path, sdxl: Path, images: Path, tmp_path: Path
) -> None:
    cfg = task_config(sd15, images, tmp_path)
    with pytest.raises(ValueError, match="embeddings of ''"):
        sd.PipelineTask.from_config(cfg, CPU, cached={"text"})
    # SDXL conditions dropped captions on zeros: no "" embeddings needed.
    sd.PipelineTask.from_config(task_config(sdxl, images, tmp_path), CPU, cached={"text"})
    # Training the encoders: they are loaded and encode the captions, the cached text is unused.
    task = sd.PipelineTask.from_config(replace(cfg, train_text_encoder=True), CPU, cached={"text"})
    assert task.cached == set() and len(task.text_encoders) == 1


class CachedBatches:
    """A :class:`~fastdiff.training.protocols.BatchLoader` serving fixed cache-style batches."""

    def __init__(self, batches: list[TrainBatch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[TrainBatch]:
        return iter([TrainBatch(**b) for b in self.batches])  # type: ignore[typeddict-item]

    def set_epoch(self, epoch: int) -> None:
        pass


def test_train_with_cache_loads_only_the_unet_and_reads_the_manifest(
    sdxl: Path, sd15: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    # LoRA: the saved output is the adapter (a full fine-tune's save loads the VAE and encoders for it).
    cfg = task_config(sdxl, images, tmp_path / "out", cache=cache, max_steps=3, lora_rank=4)
    with pytest.raises(ValueError, match=re.escape("no fastdiff-cache.json: build it with `fastdiff cache")):
        run.train(cfg, loader=CachedBatches([]))
    halves = {
        "latents": LatentEncoder.load(sdxl, None, "f32", CPU).spec,
        "text": TextEncoder.load(sdxl, None, "f32", CPU).spec,
    }
    manifest.write_manifest(cache, manifest.with_halves(None, **halves, model=str(sdxl), kind="sdxl"))
    with pytest.raises(ValueError, match=r"holds sdxl entries .* is an sd pipeline"):
        run.train(replace(cfg, model=sd15), loader=CachedBatches([]))
    served = CachedBatches([cached_batch(sdxl, pixel_batch(images))])
    built = count_constructions(monkeypatch)
    result = run.train(cfg, loader=served)
    assert built == {"UNet2DConditionModel": 1}
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    # Only the latents half cached: the text encoders load, the VAE still does not.
    only_latents = manifest.with_halves(
        None, latents=halves["latents"], text=None, model=str(sdxl), kind="sdxl"
    )
    manifest.write_manifest(cache, only_latents)
    built.clear()
    run.train(replace(cfg, max_steps=1), loader=served)
    assert built == {"UNet2DConditionModel": 1, "CLIPTextModel": 1, "CLIPTextModelWithProjection": 1}


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_sd_from_cache_conditions_dropped_captions_on_the_cached_empty_caption(
    dtype: str, sd15: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    text = TextEncoder.load(sd15, None, dtype, CPU)  # type: ignore[arg-type]
    halves = {"latents": LatentEncoder.load(sd15, None, dtype, CPU).spec, "text": text.spec}  # type: ignore[arg-type]
    manifest.write_manifest(cache, manifest.with_halves(None, **halves, model=str(sd15), kind="sd"))
    cfg = task_config(sd15, images, tmp_path / "out", cache=cache, lora_rank=4, caption_dropout=0.5)
    with pytest.raises(fastdiff.CacheMissError):
        run.train(cfg, loader=CachedBatches([]))
    expected = text.encode([""])["prompt_embeds"][0]
    shards = Shards(cache, "text", text.spec["dtype"])
    shards.add(_fastdiff.text_key("", text.spec["salt"]), {"caption": ""}, {"prompt_embeds": expected})
    shards.finish()
    hidden, pooled = empty_prompt(cache)
    assert pooled is None and torch.equal(hidden, expected.to(TORCH_DTYPES[dtype]))  # type: ignore[index]
    served = CachedBatches([cached_batch(sd15, pixel_batch(images))])
    built = count_constructions(monkeypatch)
    result = run.train(cfg, loader=served)
    assert built == {"UNet2DConditionModel": 1} and all(math.isfinite(v) for v in result.losses)
