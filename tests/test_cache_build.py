"""``fastdiff cache`` on a tiny local SD 1.x pipeline and a few small real images (nothing downloads):
entries equal the encoders bitwise at fp32, each invalidation re-encodes exactly what changed, a killed
build resumes with only the missing entries, and ``fastdiff train --cache`` trains without ever
constructing the VAE or the text encoder."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import fastdiff
import pytest
import torch
from conftest import copy_with_captions, smallest_images
from fastdiff import _fastdiff, cli
from fastdiff.cache.build import BuildReport
from fastdiff.cache.command import build_for_config
from fastdiff.cache.encoders import LatentEncoder, TextEncoder
from fastdiff.cache.manifest import read_manifest
from fastdiff.training import run
from fastdiff.training.config import TrainConfig
from fastdiff.training.sd import with_model_defaults
from fastdiff.training.setup import make_loader, with_dataset_options
from PIL import Image
from safetensors import safe_open
from tiny_sd import build_sd15

CPU = torch.device("cpu")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def sources(wallpapers: Path) -> list[Path]:
    """The 3 smallest wallpapers (with .txt captions)."""
    return smallest_images(wallpapers, 3)


@pytest.fixture
def data(sources: list[Path], tmp_path: Path) -> Path:
    return copy_with_captions(sources, tmp_path / "data")


def settings(model: Path, data: Path, cache: Path, **overrides: object) -> TrainConfig:
    base = TrainConfig(
        data=data,
        output=cache,
        cache=cache,
        model=model,
        resolution=32,
        bucket_step=8,
        batch_size=2,
        num_threads=1,
        device="cpu",
        learning_rate=1e-2,
        checkpoint_every=0,
        max_steps=2,
    )
    return replace(base, **overrides)


def build(model: Path, data: Path, cache: Path, **overrides: object) -> BuildReport:
    return build_for_config(settings(model, data, cache, **overrides), dtype="f32", progress=False)


def build_loader(model: Path, data: Path, cache: Path, **overrides: object) -> fastdiff.DataLoader:
    """The loader whose build plan ``build`` encodes (pixels on)."""
    return make_loader(
        with_model_defaults(with_dataset_options(settings(model, data, cache, **overrides))), pixels=True
    )


def read(store: _fastdiff.CacheStore, key: str) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(a) for name, a in store.read(key).items()}


def test_entries_equal_the_encoders_of_the_loaders_batches_bitwise(
    sd15: Path, data: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    report = build(sd15, data, cache)
    assert report.latents_needed == report.latents_encoded == 3 and report.failed == {}
    assert report.text_needed == report.text_encoded == 4  # 3 captions and ""
    store = _fastdiff.CacheStore(cache)
    loader = build_loader(sd15, data, cache)
    vae = LatentEncoder.load(sd15, None, "f32", CPU)
    seen = 0
    for batch in loader.iter_build():
        # The first build encoded every build batch whole: the same batches give the same bits.
        out = vae.encode(batch["pixel_values"])
        for i, key in enumerate(batch["latent_keys"]):
            entry = read(store, key)
            assert torch.equal(entry["latents"], out["latents"][i])
            assert torch.equal(entry["latents_std"], out["latents_std"][i])
            seen += 1
    assert seen == 3
    # Text: the distinct captions in caption_variants() order, then "", in one encoder batch.
    variants = loader.caption_variants()
    captions = [c for c, _ in variants] + [""]
    embeds = TextEncoder.load(sd15, None, "f32", CPU).encode(captions)["prompt_embeds"]
    keys = [k for _, k in variants] + [_fastdiff.text_key("", read_manifest(cache)["text"]["salt"])]
    for key, expected in zip(keys, embeds, strict=True):
        assert torch.equal(read(store, key)["prompt_embeds"], expected)
    again = build(sd15, data, cache)
    assert (again.latents_encoded, again.latents_decoded, again.text_encoded, again.shards) == (0, 0, 0, [])
    assert (again.latents_needed, again.text_needed) == (3, 4)


def test_an_image_edited_in_place_re_encodes_exactly_that_entry(
    sd15: Path, data: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    build(sd15, data, cache)
    image = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTS)[0]
    stat = image.stat()
    with Image.open(image) as im:
        edited = im.convert("RGB")
    edited.putpixel((0, 0), (255 - edited.getpixel((0, 0))[0], 0, 0))
    edited.save(image, format=Image.registered_extensions()[image.suffix.lower()])
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: only the bytes tell
    assert image.stat().st_mtime_ns == stat.st_mtime_ns
    report = build(sd15, data, cache)
    assert (report.latents_encoded, report.latents_decoded, report.text_encoded) == (1, 1, 0)


def test_a_rerun_on_a_complete_cache_decodes_no_image(sd15: Path, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # 2 crop variants (fewer where they land on one crop) x 2 flip states of 3 images.
    variants = {"crop": "random", "crop_variants": 2, "flip_prob": 0.5}
    first = build(sd15, data, cache, **variants)
    n = first.latents_needed
    assert 6 <= n <= 12 and first.latents_decoded == first.latents_encoded == n
    again = build(sd15, data, cache, **variants)
    assert (again.latents_decoded, again.latents_encoded, again.latents_needed) == (0, 0, n)
    assert again.seconds < first.seconds
    loader = build_loader(sd15, data, cache, **variants)
    keys = loader.build_latent_keys()
    assert len(keys) == n and all(k is not None and cached for k, cached in keys)
    assert list(loader.iter_build(missing_only=True)) == []
    stats = loader.stats()
    assert stats is not None and (stats["samples"], stats["failed"], stats["decode_s"]) == (0, 0, 0.0)
    # The full plan still decodes every sample, and its keys are build_latent_keys' in order.
    full = [k for b in loader.iter_build() for k in b["latent_keys"]]
    assert full == [k for k, _ in keys]
    stats = loader.stats()
    assert stats is not None and stats["samples"] == n and stats["decode_s"] > 0


def test_a_renamed_file_re_encodes_nothing(sd15: Path, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build(sd15, data, cache)
    image = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTS)[0]
    image.rename(data / f"renamed{image.suffix}")
    image.with_suffix(".txt").rename(data / "renamed.txt")
    report = build(sd15, data, cache)
    assert (report.latents_encoded, report.text_encoded, report.latents_needed) == (0, 0, 3)


def test_two_files_swapping_names_follow_their_content(sd15: Path, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build(sd15, data, cache)
    store = _fastdiff.CacheStore(cache)
    before = {
        b["paths"][i]: k
        for b in build_loader(sd15, data, cache).iter_build()
        for i, k in enumerate(b["latent_keys"])
    }
    a, b = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTS)[:2]
    if a.suffix != b.suffix:
        pytest.skip("the two smallest images differ in format")
    tmp = data / "swap.tmp"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    report = build(sd15, data, cache)
    assert report.latents_encoded == 0
    after = {
        b_["paths"][i]: k
        for b_ in build_loader(sd15, data, cache).iter_build()
        for i, k in enumerate(b_["latent_keys"])
    }
    assert after[str(a)] == before[str(b)] and after[str(b)] == before[str(a)]
    assert all(store.contains(list(after.values())))


def test_a_resolution_change_re_encodes_every_latent(sd15: Path, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build(sd15, data, cache)
    report = build(sd15, data, cache, resolution=48)
    assert report.latents_encoded == report.latents_needed == 3 and report.text_encoded == 0


def test_a_vae_scaling_factor_change_re_encodes_every_latent(sd15: Path, data: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(sd15, model)
    cache = tmp_path / "cache"
    build(model, data, cache)
    path = model / "vae" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "scaling_factor": 0.2}))
    report = build(model, data, cache)
    assert report.latents_encoded == report.latents_needed == 3 and report.text_encoded == 0
    assert read_manifest(cache)["latents"]["vae"]["scaling_factor"] == 0.2


def test_one_caption_edited_re_encodes_that_text_entry_only(sd15: Path, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build(sd15, data, cache)
    caption = sorted(data.glob("*.txt"))[0]
    caption.write_text(caption.read_text() + " edited")
    report = build(sd15, data, cache)
    assert (report.latents_encoded, report.text_encoded, report.text_needed) == (0, 1, 4)


def test_many_images_sharing_a_caption_share_one_text_entry(sd15: Path, tmp_path: Path) -> None:
    data = tmp_path / "many"
    data.mkdir()
    for i in range(100):
        Image.new("RGB", (16, 16), (i, 2 * i, 255 - i)).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text("the same caption")
    cache = tmp_path / "cache"
    cfg = settings(sd15, data, cache, resolution=16, batch_size=50)
    report = build_for_config(cfg, latents=False, dtype="f32", progress=False)
    assert (report.text_needed, report.text_encoded) == (2, 2)  # the caption, and "" (dropout)
    assert len(_fastdiff.CacheStore(cache).keys("text")) == 2


def test_a_killed_build_reruns_only_the_missing_entries(sd15: Path, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # One entry per shard, and a pause after each: the kill lands between two finished shards.
    script = (
        "import sys, time, fastdiff.cache.shards as s\n"
        "s.SHARD_ENTRIES = 1\n"
        "add = s.Shards.add\n"
        "def slow(self, *a, **k):\n"
        "    add(self, *a, **k)\n"
        "    time.sleep(1)\n"
        "s.Shards.add = slow\n"
        "from fastdiff.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [
        "cache",
        "--model",
        str(sd15),
        "--data",
        str(data),
        "--output",
        str(cache),
        "--resolution",
        "32",
        "--bucket-step",
        "8",
        "--batch-size",
        "1",
        "--num-threads",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "f32",
    ]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(cache.glob("latents-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_fastdiff.CacheStore(cache).keys("latents"))
    assert 1 <= done < 3 and _fastdiff.CacheStore(cache).corrupt_shards() == []
    report = build(sd15, data, cache)
    assert report.latents_encoded == 3 - done and report.latents_needed == 3


def test_two_builds_on_one_cache_at_once_take_turns(sd15: Path, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # Both processes reach the lock together (each waits for the other's ready file), and the one that
    # gets it holds it for a while (a pause per entry): the other must wait, then finds every entry.
    script = (
        "import os, sys, time, contextlib, fastdiff.cache.build as b, fastdiff.cache.shards as s\n"
        "ready = sys.argv.pop(1)\n"
        "add = s.Shards.add\n"
        "def slow(self, *a, **k):\n"
        "    add(self, *a, **k)\n"
        "    time.sleep(0.3)\n"
        "s.Shards.add = slow\n"
        "lock = b.locked\n"
        "@contextlib.contextmanager\n"
        "def together(cache):\n"
        "    open(os.path.join(ready, str(os.getpid())), 'w').close()\n"
        "    deadline = time.monotonic() + 120\n"
        "    while len(os.listdir(ready)) < 2 and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "    with lock(cache):\n"
        "        yield\n"
        "b.locked = together\n"
        "from fastdiff.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    ready = tmp_path / "ready"
    ready.mkdir()
    args = ["cache", "--model", str(sd15), "--data", str(data), "--output", str(cache)]
    args += ["--resolution", "32", "--bucket-step", "8", "--batch-size", "1", "--num-threads", "1"]
    args += ["--device", "cpu", "--dtype", "f32"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ready), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    summaries = sorted(out for out, _ in outs)
    # One encoded everything, the other (after waiting for the lock) nothing.
    assert "latents 0 encoded / 3 needed, text 0 encoded / 4 needed" in summaries[0], summaries
    assert "latents 3 encoded / 3 needed, text 4 encoded / 4 needed" in summaries[1], summaries
    assert sum("waiting for another `fastdiff cache`" in err for _, err in outs) == 1, outs
    store = _fastdiff.CacheStore(cache)
    assert store.corrupt_shards() == [] and not list(cache.glob(".*.partial"))
    # Every entry is in exactly one shard: no key was encoded twice.
    served: list[str] = []
    for shard in sorted(cache.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            served += {name.split("/")[0] for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert len(served) == len(set(served)) == 3 + 4
    assert sorted(served) == sorted(store.keys("latents") + store.keys("text"))
    again = build(sd15, data, cache)
    assert (again.latents_decoded, again.latents_encoded, again.text_encoded) == (0, 0, 0)


def test_train_from_the_cache_never_constructs_the_vae_or_text_encoder(
    sd15: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_cache_model import count_constructions

    cache = tmp_path / "cache"
    cfg = settings(sd15, data, cache, output=tmp_path / "out", lora_rank=4, max_steps=2)
    result = run.train(replace(cfg, cache_build=True))
    assert all(math.isfinite(v) for v in result.losses)
    built = count_constructions(monkeypatch)
    result = run.train(replace(cfg, output=tmp_path / "again"))
    assert built == {"UNet2DConditionModel": 1}
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)


def test_an_undecodable_image_is_recorded_as_failed_by_content_hash(
    sd15: Path, data: Path, tmp_path: Path
) -> None:
    broken = data / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))  # a JPEG signature, then nothing decodable
    (data / "broken.txt").write_text("a broken file")
    cache = tmp_path / "cache"
    report = build(sd15, data, cache)
    assert report.latents_encoded == 3
    assert list(report.failed) == [_fastdiff.content_hash(broken.read_bytes())]
    assert read_manifest(cache)["failed"] == report.failed


def test_a_truncated_shard_is_never_served_and_its_entries_are_re_encoded(
    sd15: Path, data: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    build(sd15, data, cache)
    (shard,) = cache.glob("latents-*.safetensors")
    shard.write_bytes(shard.read_bytes()[:-100])
    store = _fastdiff.CacheStore(cache)
    assert store.keys("latents") == [] and [Path(p) for p, _ in store.corrupt_shards()] == [shard]
    report = build(sd15, data, cache)
    assert report.latents_encoded == 3 and report.text_encoded == 0


def scan_cache(data: Path, cache: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    """``fastdiff scan DATA --cache CACHE`` with the build's loader options: its exit status 0 and the
    ``cache`` part of its JSON."""
    argv = ["scan", str(data), "--cache", str(cache), "--resolution", "32", "--bucket-step", "8"]
    capsys.readouterr()
    assert cli.main([*argv, *flags]) == 0
    text = capsys.readouterr().out
    assert cli.main([*argv, *flags, "--json"]) == 0
    coverage = json.loads(capsys.readouterr().out)["cache"]
    for half in ("latents", "text"):
        present, needed = coverage[f"{half}_present"], coverage[f"{half}_needed"]
        line = f"{half}: not in this cache" if needed is None else f"{half}: {present} / {needed} present"
        assert line in text, text
    assert f"corrupt shards: {len(coverage['corrupt_shards'])}" in text
    assert f"failed images (manifest): {coverage['failed']}" in text
    return cast(dict[str, Any], coverage)


def test_scan_reports_the_coverage_of_a_cache(
    sd15: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = data / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    cache = tmp_path / "cache"
    build(sd15, data, cache)
    got = scan_cache(data, cache, capsys)
    # 3 images (the broken one is skipped by the scan and recorded as failed), 3 captions + "".
    assert got == {
        "cache": str(cache),
        "latents_present": 3,
        "latents_needed": 3,
        "text_present": 4,
        "text_needed": 4,
        "corrupt_shards": [],
        "failed": 1,
    }
    # Other options, other keys: none of them is cached (the manifest's salts still apply).
    other = scan_cache(data, cache, capsys, "--resolution", "48")
    assert (other["latents_present"], other["latents_needed"], other["text_present"]) == (0, 3, 4)
    # One image edited: 2 of its 3 entries; a truncated shard: not served, listed.
    image = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTS and p != broken)[0]
    with Image.open(image) as im:
        edited = im.convert("RGB")
    edited.putpixel((0, 0), (255 - edited.getpixel((0, 0))[0], 0, 0))
    edited.save(image, format=Image.registered_extensions()[image.suffix.lower()])
    assert scan_cache(data, cache, capsys)["latents_present"] == 2
    (shard,) = cache.glob("text-*.safetensors")
    shard.write_bytes(shard.read_bytes()[:-100])
    got = scan_cache(data, cache, capsys)
    assert (got["text_present"], got["text_needed"]) == (0, 4)
    assert [Path(p) for p, _ in got["corrupt_shards"]] == [shard]
    # A latents-only cache: text is not in it.
    only = tmp_path / "only"
    build_for_config(settings(sd15, data, only), text=False, dtype="f32", progress=False)
    got = scan_cache(data, only, capsys)
    assert (got["latents_present"], got["text_needed"]) == (3, None)


def test_gc_deletes_the_shards_of_an_old_resolution(
    sd15: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastdiff import cli

    cache = tmp_path / "cache"
    build(sd15, data, cache)
    (old,) = cache.glob("latents-*.safetensors")
    argv = [
        "cache",
        "--model",
        str(sd15),
        "--data",
        str(data),
        "--output",
        str(cache),
        "--resolution",
        "48",
        "--bucket-step",
        "8",
        "--batch-size",
        "2",
        "--num-threads",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "--gc",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "latents 3 encoded / 3 needed, text 0 encoded / 4 needed" in out and "gc deleted 1 orphan" in out
    assert not old.exists() and len(_fastdiff.CacheStore(cache).keys("latents")) == 3


def test_cache_takes_the_train_flags_of_the_data_and_model_only(tmp_path: Path) -> None:
    from fastdiff import cli
    from fastdiff.cache.command import CACHE_FIELDS, cache_config

    parser = cli.build_parser()
    args = parser.parse_args(
        ["cache", "--output", str(tmp_path), "--model", "m", "--data", "d", "--crop-variants", "2"]
    )
    config = cache_config(args)
    assert config.cache == config.output == tmp_path and config.crop_variants == 2
    assert {"crop", "flip_prob", "crop_variants", "text_variants", "resolution", "model"} <= set(CACHE_FIELDS)
    for train_only in (["--max-steps", "3"], ["--cache-build"], ["--cache", "c"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["cache", "--output", str(tmp_path), *train_only])


def shard_entries(shards: set[Path]) -> list[str]:
    """The entry keys the shard files hold, one per entry (a key in two shards counts twice)."""
    from safetensors import safe_open

    keys: list[str] = []
    for path in sorted(shards):
        with safe_open(str(path), framework="pt") as f:
            keys += sorted({name.split("/")[0] for name in f.keys()})  # noqa: SIM118
    return keys


def test_on_miss_encode_fills_exactly_the_missing_entries(
    sd15: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastdiff.cache import build as builder

    images = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    new = images[-1]
    # Random crops (2 variants) and flips: 4 latent entries per image. Built one sample per batch and
    # one caption per text-encoder call, so every entry is one encoder call whichever build made it
    # (bitwise comparable: on the CPU a batch's rows can round differently from single rows).
    monkeypatch.setattr(builder, "TEXT_BATCH", 1)
    opts: dict[str, object] = {
        "resolution": 48,  # the last (landscape) image has room for different crops
        "bucket_step": 8,
        "num_threads": 1,
        "crop": "random",
        "crop_variants": 2,
        "flip_prob": 0.5,
        "seed": 3,
    }
    full = tmp_path / "full"
    fastdiff.DataLoader(data, cache=full, on_miss="encode", model=sd15, batch_size=1, **opts)
    # A cache of the other images only: it lacks `new`'s latents and its caption's text entry.
    others = tmp_path / "others"
    others.mkdir()
    for image in images[:-1]:
        shutil.copy(image, others / image.name)
        shutil.copy(image.with_suffix(".txt"), others / f"{image.stem}.txt")
    cache = tmp_path / "cache"
    fastdiff.DataLoader(others, cache=cache, on_miss="encode", model=sd15, batch_size=1, **opts)
    before = _fastdiff.CacheStore(cache)
    latents_before, text_before = set(before.keys("latents")), set(before.keys("text"))
    shards_before = set(cache.glob("*.safetensors"))

    # on_miss="error" (the default) leaves the cache as it is: the new image is a miss naming it.
    strict = fastdiff.DataLoader(data, cache=cache, on_error="raise", batch_size=2, **opts)
    with pytest.raises(fastdiff.CacheMissError, match=re.escape(f"{new}: not in the cache")):
        list(strict)
    assert set(cache.glob("*.safetensors")) == shards_before

    # The encode goes through the builder's missing-only plan: it decodes the new image's 4 samples only.
    reports: list[BuildReport] = []
    real_build = builder.build

    def recording_build(*args: Any, **kwargs: Any) -> BuildReport:
        reports.append(real_build(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(builder, "build", recording_build)
    fastdiff.DataLoader(data, cache=cache, on_miss="encode", model=sd15, batch_size=1, **opts)
    (filling,) = reports
    assert (filling.latents_decoded, filling.latents_encoded, filling.text_encoded) == (4, 4, 1)
    after = _fastdiff.CacheStore(cache)
    plan = fastdiff.DataLoader(data, cache=full, pixels=True, batch_size=1, **opts)
    samples = [
        s for b in plan.iter_build() for s in zip(b["paths"], b["latent_keys"], b["captions"], strict=True)
    ]
    wanted = {key for path, key, _ in samples if path == str(new)}
    (caption,) = {caption for path, _, caption in samples if path == str(new)}
    assert len(wanted) == 4
    assert set(after.keys("latents")) - latents_before == wanted
    text_key = _fastdiff.text_key(caption, read_manifest(cache)["text"]["salt"])
    assert set(after.keys("text")) - text_before == {text_key}
    # Nothing was encoded twice: the new shards hold exactly the 5 new entries.
    assert sorted(shard_entries(set(cache.glob("*.safetensors")) - shards_before)) == sorted(
        {*wanted, text_key}
    )
    # Served (any batch size: the keys do not depend on it), the filled cache gives the full cache's
    # batches, bit for bit.
    for epoch in range(2):
        filled = fastdiff.DataLoader(data, cache=cache, batch_size=2, **opts)
        reference = fastdiff.DataLoader(data, cache=full, batch_size=2, **opts)
        filled.set_epoch(epoch)
        reference.set_epoch(epoch)
        pairs = list(zip(filled, reference, strict=True))
        assert sum(str(new) in b["paths"] for b, _ in pairs) == 1
        for got, want in pairs:
            assert got["paths"] == want["paths"] and got["latent_keys"] == want["latent_keys"]
            for name in ("latents", "latents_std", "prompt_embeds"):
                assert torch.equal(got[name], want[name]), name


def test_on_miss_needs_a_cache_and_a_model(sd15: Path, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r'on_miss="encode" needs cache=.* and model=.*model=None'):
        fastdiff.DataLoader(data, cache=cache, on_miss="encode")
    with pytest.raises(ValueError, match=r'on_miss="encode" needs cache=.*cache=None'):
        fastdiff.DataLoader(data, on_miss="encode", model=sd15)
    with pytest.raises(ValueError, match=r'model= is used only by on_miss="encode"'):
        fastdiff.DataLoader(data, cache=cache, model=sd15)
    with pytest.raises(ValueError, match="on_miss"):
        fastdiff.DataLoader(data, cache=cache, on_miss="build")  # type: ignore[arg-type]
    assert not cache.exists()


def test_a_rebuild_without_dtype_keeps_the_caches_dtype(sd15: Path, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_for_config(settings(sd15, data, cache), dtype="bf16", progress=False)  # the VAE is stored f32
    again = build_for_config(settings(sd15, data, cache), progress=False)
    # The bf16 salt is kept, so the missing-only plan is empty: nothing decoded either.
    assert (again.latents_decoded, again.latents_encoded, again.text_encoded) == (0, 0, 0)
    manifest = read_manifest(cache)
    assert manifest["latents"]["dtype"] == manifest["text"]["dtype"] == "bf16"


def test_torchrun_shares_the_build_across_ranks(sd15: Path, data: Path, tmp_path: Path) -> None:
    args = ["cache", "--model", str(sd15), "--data", str(data), "--output", str(tmp_path / "two")]
    args += ["--resolution", "32", "--bucket-step", "8", "--batch-size", "1", "--num-threads", "1"]
    args += ["--device", "cpu", "--dtype", "f32"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [*torchrun, "-m", "fastdiff", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    # Rank 0 alone prints the summary, of both ranks' work: 3 build batches (2 + 1) and 4 captions (2 + 2).
    [summary] = [line for line in proc.stdout.splitlines() if line.startswith("cache ")]
    assert "latents 3 encoded / 3 needed, text 4 encoded / 4 needed, 0 failed, 4 shards" in summary, summary
    assert summary.endswith("by 2 ranks"), summary

    build(sd15, data, tmp_path / "one", batch_size=1)
    two, one = _fastdiff.CacheStore(tmp_path / "two"), _fastdiff.CacheStore(tmp_path / "one")
    for kind in ("latents", "text"):
        assert sorted(two.keys(kind)) == sorted(one.keys(kind)) != []
    served: list[str] = []
    for shard in sorted((tmp_path / "two").glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            served += {name.split("/")[0] for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert len(served) == len(set(served)) == 3 + 4  # each entry encoded by one rank only
    for key in served:
        a, b = read(two, key), read(one, key)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), key
