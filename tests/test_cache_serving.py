"""Issue 11, serving from a cache: a tiny cache written with the native ``ShardWriter`` from a
deterministic function of the loader's own build batches (fake "latents" = an 8x average pool of
``pixel_values``; fake text embeddings from the caption's characters), then served with
``pixels=False`` and compared batch for batch with pixel mode + the same function: order, SDXL sizes,
captions, resume mid-epoch and the rank split. The real VAE / text-encoder equality is the builder's
test; here the loader's part: same draws, right entry in the right slot, no file read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastdiff
import numpy as np
import pytest
import torch
from fastdiff import _fastdiff as native
from PIL import Image

MANIFEST = {
    "format": "fastdiff-cache-1",
    "latents": {
        "salt": "000102030405060708090a0b0c0d0e0f",
        "dtype": "bf16",
        "channels": 3,
        "downscale": 8,
        "tensors": ["latents", "latents_std"],
    },
    "text": {
        "salt": "0f0e0d0c0b0a09080706050403020100",
        "dtype": "f32",
        "tensors": {"prompt_embeds": [2, 3], "pooled_prompt_embeds": [3]},
    },
    "failed": {},
}


def fake_latents(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 3, H, W]`` pixels -> (latents, latents_std) ``[B, 3, H/8, W/8]`` in bf16."""
    mean = torch.nn.functional.avg_pool2d(pixels.float(), 8)
    return mean.to(torch.bfloat16), (mean.abs() + 0.5).to(torch.bfloat16)


def fake_text(caption: str) -> dict[str, torch.Tensor]:
    codes = [float(ord(c)) for c in caption] or [0.0]
    pooled = torch.tensor([len(caption), sum(codes) % 997, codes[0]], dtype=torch.float32)
    return {"pooled_prompt_embeds": pooled, "prompt_embeds": torch.stack([pooled, -pooled])}


def raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(11)
    for i, (w, h) in enumerate([(120, 64), (64, 120), (80, 80), (100, 70), (70, 100), (90, 60), (96, 96)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        (root / f"im{i}.txt").write_text(f"id{i}, red, green, blue")
    return root


def options(data: Path, **kwargs: Any) -> dict[str, Any]:
    subset = fastdiff.Subset(data, shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.25)
    base: dict[str, Any] = {
        "subsets": [subset],
        "resolution": 64,
        "bucket_step": 16,
        "batch_size": 2,
        "crop": "random",
        "crop_variants": 2,
        "text_variants": 2,
        "flip_prob": 0.5,
        "seed": 4,
        "num_threads": 2,
    }
    return {**base, **kwargs}


@pytest.fixture(scope="module")
def cache(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    (root / "fastdiff-cache.json").write_text(json.dumps(MANIFEST))
    builder = fastdiff.DataLoader(**options(data, cache=root, pixels=True))
    writer = native.ShardWriter(root, "latents")
    built = 0
    for batch in builder.iter_build():
        latents, std = fake_latents(batch["pixel_values"])
        for i, (key, meta) in enumerate(zip(batch["latent_keys"], batch["latent_provenance"], strict=True)):
            assert key is not None
            shape = tuple(latents.shape[1:])
            writer.add(
                key,
                meta,
                [("latents", "bf16", shape, raw(latents[i])), ("latents_std", "bf16", shape, raw(std[i]))],
            )
            built += 1
    writer.finish()
    # 7 images x 2 crop variants x 2 flip states, less variants that land on the same crop.
    assert 7 * 2 <= built <= 7 * 2 * 2
    writer = native.ShardWriter(root, "text")
    variants = builder.caption_variants()
    assert ("", variants[0][1]) == variants[0]  # caption dropout: one shared "" entry
    for caption, key in variants:
        assert key is not None
        tensors = fake_text(caption)
        writer.add(
            key,
            json.dumps({"caption": caption}),
            [(n, "f32", tuple(t.shape), raw(t)) for n, t in sorted(tensors.items())],
        )
    writer.finish()
    return root


def check_equal(pixel: list[dict[str, Any]], served: list[dict[str, Any]]) -> None:
    assert len(pixel) == len(served)
    for want, got in zip(pixel, served, strict=True):
        assert "pixel_values" not in got
        for key in ("captions", "original_sizes", "crop_top_lefts", "target_sizes", "paths"):
            assert got[key] == want[key], key
        latents, std = fake_latents(want["pixel_values"])
        assert got["latents"].dtype == torch.bfloat16 and got["latents"].shape == latents.shape
        assert torch.equal(got["latents"], latents) and torch.equal(got["latents_std"], std)
        texts = [fake_text(c) for c in want["captions"]]
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            assert torch.equal(got[name], torch.stack([t[name] for t in texts])), name
        assert all(isinstance(k, str) and len(k) == 32 for k in got["latent_keys"] + got["text_keys"])


def test_cached_batches_equal_pixel_batches(data: Path, cache: Path) -> None:
    for rank in (0, 1):
        split = {"rank": rank, "world_size": 2}
        pixel = fastdiff.DataLoader(**options(data, **split))
        served = fastdiff.DataLoader(**options(data, cache=cache, **split))
        for epoch in range(3):
            pixel.set_epoch(epoch)
            served.set_epoch(epoch)
            check_equal(list(pixel), list(served))
        assert served.report["skipped"] == []

    # Resume mid-epoch from a saved state: the rest of the epoch as uninterrupted.
    served = fastdiff.DataLoader(**options(data, cache=cache))
    served.set_epoch(1)
    whole = list(served)
    served.set_epoch(1)
    it = iter(served)
    next(it), next(it)
    state = served.state_dict()
    again = fastdiff.DataLoader(**options(data, cache=cache))
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(whole) - 2
    for a, b in zip(rest, whole[2:], strict=True):
        assert a["paths"] == b["paths"] and torch.equal(a["latents"], b["latents"])


def test_cache_refusals_and_misses(data: Path, cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set crop_variants"):
        fastdiff.DataLoader(**options(data, cache=cache, crop_variants=None))
    with pytest.raises(ValueError, match="set text_variants"):
        fastdiff.DataLoader(**options(data, cache=cache, text_variants=None))
    with pytest.raises(ValueError, match="pixels=False needs a cache"):
        fastdiff.DataLoader(**options(data, pixels=False))
    # The images moved to another folder, one of them edited (same size and format): the moved ones
    # are still served (keys follow the content, not the path), the edited one misses, naming it.
    # (The "content changed" wording for a file edited in place is the core's test, serve.rs.)
    copy = tmp_path / "images"
    copy.mkdir()
    for p in data.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    rng = np.random.default_rng(99)
    Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(copy / "im2.png")
    strict = fastdiff.DataLoader(**options(copy, cache=cache, on_error="raise"))
    with pytest.raises(fastdiff.CacheMissError, match=r"im2\.png: not in the cache"):
        list(strict)
    # Skipped, it is reported and replaced by a stand-in, as a failed decode would be.
    lenient = fastdiff.DataLoader(**options(copy, cache=cache))
    batches = list(lenient)
    assert sum(len(b["paths"]) for b in batches) == 7
    (skip,) = lenient.report["skipped"]
    assert skip["code"] == "cache_miss" and skip["path"].endswith("im2.png")
