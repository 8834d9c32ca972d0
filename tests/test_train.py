"""The training loop on a few real wallpapers: logs, plots, safetensors weights, sampling, mixed precision."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import typing
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import fastdiff
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from fastdiff.options import LOADER
from fastdiff.training.config import DATASET_FIELDS, TrainConfig
from fastdiff.training.flags import add_train_arguments, config_from_args
from fastdiff.training.loop import autocast_dtype
from fastdiff.training.run import TrainResult, train
from fastdiff.training.settings import GROUPS
from fastdiff.training.setup import make_loader, with_dataset_options
from fastdiff.training.tiny import TinyModels, build_tiny_models, sample, tokenize
from fastdiff.types import Batch, Crop
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}
N_IMAGES = 8
STEPS = 6


@pytest.fixture(scope="module")
def small_set(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 8 smallest wallpaper files (256-400 px) and their captions, in their own folder."""
    images = sorted(
        (p for p in wallpapers.iterdir() if p.suffix.lower() in IMAGE_EXTS),
        key=lambda p: (p.stat().st_size, p.name),
    )[:N_IMAGES]
    dest = tmp_path_factory.mktemp("small")
    for image in images:
        shutil.copy(image, dest / image.name)
        shutil.copy(image.with_suffix(".txt"), dest / f"{image.stem}.txt")
    return dest


def config(data: Path, output: Path, **overrides: object) -> TrainConfig:
    """A CPU run small enough for a test: batches of 4 at resolution 64."""
    base = TrainConfig(data=data, output=output, resolution=64, batch_size=4, max_steps=STEPS, device="cpu")
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def run(small_set: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """One short training run, shared by the tests that inspect its outputs."""
    return train(config(small_set, tmp_path_factory.mktemp("run")))


def initial_models(result: TrainResult, cfg: TrainConfig) -> TinyModels:
    return build_tiny_models(
        result.tokenizer,
        resolution=cfg.resolution,
        unet_channels=cfg.unet_channels,
        layers_per_block=cfg.layers_per_block,
        text_hidden_size=cfg.text_hidden_size,
        text_layers=cfg.text_layers,
        seed=cfg.seed,
    )


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():
        assert torch.equal(tensor.cpu(), sb[name].cpu()), name


def test_loss_is_finite_and_logged_to_csv_and_png(run: TrainResult) -> None:
    assert len(run.losses) == STEPS
    assert all(math.isfinite(v) for v in run.losses)
    assert run.skipped_steps == 0
    with run.loss_csv.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss", "grad_norm", "lr"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, STEPS + 1))
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(run.losses, rel=1e-5)
    assert all(math.isfinite(float(r[2])) and float(r[2]) > 0 for r in rows[1:])
    assert [float(r[3]) for r in rows[1:]] == [run.config.learning_rate] * STEPS  # constant schedule
    with Image.open(run.loss_png) as im:
        assert im.format == "PNG"
        assert im.width > 100 and im.height > 100


def test_safetensors_weights_reload_equal_to_trained_and_differ_from_init(run: TrainResult) -> None:
    assert (run.output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run.output / "text_encoder" / "model.safetensors").is_file()
    unet = UNet2DConditionModel.from_pretrained(run.output / "unet")
    text_encoder = CLIPTextModel.from_pretrained(run.output / "text_encoder")
    assert_same_weights(unet, run.unet)
    assert_same_weights(text_encoder, run.text_encoder)

    init = initial_models(run, config(Path(), Path()))
    for trained, initial in [(run.unet, init.unet), (run.text_encoder, init.text_encoder)]:
        changed = [
            name
            for name, t in trained.state_dict().items()
            if not torch.equal(t.cpu(), initial.state_dict()[name])
        ]
        assert changed, f"{type(trained).__name__}: no weight changed"


def test_tokenizer_reloads_offline_and_knows_the_caption_words(run: TrainResult, small_set: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(run.output / "tokenizer")
    captions = fastdiff.DataLoader(small_set).captions
    assert len(captions) == N_IMAGES and all(captions)
    ids = tokenize(tokenizer, captions)
    assert torch.equal(ids, tokenize(run.tokenizer, captions))
    assert ids.shape == (N_IMAGES, TrainConfig.max_caption_tokens)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert not (ids == tokenizer.unk_token_id).any()
    assert (tokenize(tokenizer, ["a zebra"]) == tokenizer.unk_token_id).sum() == 1


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_returns_images_of_requested_shape(run: TrainResult, sampler: str) -> None:
    def draw() -> torch.Tensor:
        return sample(
            run.unet,
            run.text_encoder,
            run.tokenizer,
            ["a desktop wallpaper", "a desktop wallpaper, grey"],
            noise_scheduler=run.noise_scheduler,
            height=48,
            width=80,
            num_inference_steps=3,
            guidance_scale=2.0,
            sampler=sampler,
            seed=7,
        )

    images = draw()
    assert images.shape == (2, 3, 48, 80)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, draw())
    assert run.unet.training and run.text_encoder.training


def test_bf16_mixed_precision_on_cpu(small_set: Path, tmp_path: Path) -> None:
    result = train(config(small_set, tmp_path, max_steps=3, mixed_precision="bf16", unet_channels=(16, 32)))
    assert len(result.losses) == 3
    assert all(math.isfinite(v) for v in result.losses)
    assert result.unet.dtype == torch.float32


def test_v_prediction_trains_and_is_saved_in_the_scheduler_config(small_set: Path, tmp_path: Path) -> None:
    result = train(
        config(small_set, tmp_path, max_steps=3, prediction_type="v_prediction", unet_channels=(16, 32))
    )
    assert all(math.isfinite(v) for v in result.losses)
    assert DDPMScheduler.from_pretrained(tmp_path / "scheduler").config.prediction_type == "v_prediction"


def test_fp16_needs_cuda() -> None:
    with pytest.raises(ValueError, match="fp16"):
        autocast_dtype("fp16", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_with_grad_scaler_on_cuda(small_set: Path, tmp_path: Path) -> None:
    result = train(config(small_set, tmp_path, max_steps=4, mixed_precision="fp16", device="cuda"))
    assert result.device.type == "cuda"
    assert len(result.losses) == 4
    assert all(math.isfinite(v) for v in result.losses)


class NanLoader:
    """A loader of the ``fastdiff.DataLoader`` form whose every batch is NaN: every loss is non-finite."""

    captions = ("a cat", "a dog")  # its images' captions: the from-scratch vocabulary

    def __len__(self) -> int:
        return 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        yield {
            "pixel_values": torch.full((2, 3, 32, 48), float("nan")),
            "captions": ["a cat", "a dog"],
            "original_sizes": [(32, 48)] * 2,
            "crop_top_lefts": [(0, 0)] * 2,
            "target_sizes": [(32, 48)] * 2,
            "paths": ["a.png", "b.png"],
        }


def test_non_finite_loss_skips_the_update_and_is_counted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cfg = config(data, tmp_path / "out", max_steps=3, unet_channels=(16, 32))
    result = train(cfg, loader=NanLoader())
    assert result.skipped_steps == 3
    assert all(math.isnan(v) for v in result.losses)
    assert (tmp_path / "out" / "loss.csv").read_text().splitlines() == [
        "step,loss,grad_norm,lr",
        "1,nan,nan,0.001",
        "2,nan,nan,0.001",
        "3,nan,nan,0.001",
    ]
    init = initial_models(result, cfg)
    assert_same_weights(result.unet, init.unet)
    assert_same_weights(result.text_encoder, init.text_encoder)


def test_every_config_field_is_a_cli_flag(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    defaults = config_from_args(parser.parse_args(["--data", "d", "--output", "o"]))
    assert defaults == TrainConfig(data=Path("d"), output=Path("o"))
    argv = ["--data", "d", "--output", "o", "--unet-channels", "16", "32", "--mixed-precision", "bf16"]
    args = parser.parse_args([*argv, "--steps", "7", "--min-bucket-side", "32", "--num-threads", "1"])
    cfg = config_from_args(args)
    assert (cfg.unet_channels, cfg.mixed_precision, cfg.max_steps) == ((16, 32), "bf16", 7)
    assert (cfg.min_bucket_side, cfg.num_threads) == (32, 1)
    assert set(vars(args)) == {f.name for f in fields(TrainConfig)} | {"config"}


def test_train_help_lists_every_flag_in_its_group_with_the_field_help() -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    assert [t for t in groups if t in GROUPS] == list(GROUPS)
    for f in fields(TrainConfig):
        assert f.name in groups[f.metadata["group"]], f.name
    text = " ".join(parser.format_help().split())
    assert "--max-steps N, --steps N Optimizer steps to run" in text
    assert "(default: 500)" in text
    assert "From scratch only: UNet block_out_channels" in text
    assert "unet_channels: From scratch only: UNet block_out_channels" in (TrainConfig.__doc__ or "")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"bucket_step": 16, "unet_channels": (32,) * 6}, "downsampling"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"unet_channels": (32, 60)}, "multiples"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_config_rejects_invalid_values(override: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(data=Path(), output=Path(), **override)


#: The loader options that are also :class:`TrainConfig` fields (``None``: the dataset config's value).
LOADER_FIELDS = (
    "resolution",
    "batch_size",
    "bucket_step",
    "min_bucket_side",
    "max_bucket_side",
    "min_bucket_fill",
    "max_extra_crop",
    "crop",
    "flip_prob",
    "crop_variants",
    "text_variants",
    "validation_split",
)


def test_loader_fields_take_bounds_choices_and_doc_from_the_option_schema() -> None:
    assert DATASET_FIELDS == LOADER_FIELDS
    by_name = {f.name: f for f in fields(TrainConfig)}
    for name in LOADER_FIELDS:
        f, option = by_name[name], LOADER[name]
        assert f.default is None, name
        assert (f.metadata["min"], f.metadata["max"]) == (option.minimum, option.maximum), name
        assert f.metadata["choices"] == (option.allowed or None), name
        assert f.metadata["help"].startswith(option.doc.replace("``", "")), name
    assert by_name["crop"].metadata["choices"] == typing.get_args(Crop)
    assert (by_name["flip_prob"].metadata["min"], by_name["flip_prob"].metadata["max"]) == (0, 1)


def test_cli_refuses_a_flip_prob_outside_0_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastdiff import cli

    argv = ["train", "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--flip-prob", "1.5"]
    assert cli.main(argv) == 2
    assert "fastdiff train: error: flip_prob must be in [0, 1] or None, got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_from_scratch_resume_reproduces_the_uninterrupted_run(small_set: Path, tmp_path: Path) -> None:
    cfg = config(
        small_set,
        tmp_path / "full",
        resolution=32,
        max_steps=3,
        batch_size=2,
        unet_channels=(16, 32),
        checkpoint_every=2,
        gradient_accumulation_steps=2,
        ema_decay=0.9,
        snr_gamma=5.0,
        crop="random",
        flip_prob=0.5,
        num_threads=1,
    )
    full = train(cfg)
    resumed = train(replace(cfg, output=tmp_path / "resumed", resume=tmp_path / "full" / "checkpoint-2"))
    assert resumed.first_step == 3
    assert resumed.losses == full.losses[2:]
    assert_same_weights(resumed.unet, full.unet)
    assert_same_weights(resumed.text_encoder, full.text_encoder)


@pytest.mark.usefixtures("one_torch_thread")
def test_too_many_consecutive_non_finite_steps_stop_the_run(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cfg = config(data, tmp_path / "out", max_steps=5, unet_channels=(16, 32), max_consecutive_skips=2)
    with pytest.raises(RuntimeError, match=r"2 consecutive steps .* a\.png, b\.png"):
        train(cfg, loader=NanLoader())


def write_dataset_config(root: Path) -> Path:
    """A two-subset dataset config: captions from .txt files, and (a reg subset) from metadata.jsonl."""
    (root / "a").mkdir()
    for i in range(3):
        Image.new("RGB", (48, 48), (80 * i, 40, 200)).save(root / "a" / f"{i}.png")
        (root / "a" / f"{i}.txt").write_text(f"a blue square, tone {i}\n")
    (root / "b").mkdir()
    Image.new("RGB", (64, 32), (250, 250, 0)).save(root / "b" / "wide.png")
    (root / "b" / "metadata.jsonl").write_text('{"file_name": "wide.png", "text": "a yellow zebra"}\n')
    config = root / "dataset.toml"
    config.write_text(
        "[general]\nresolution = 32\nbatch_size = 2\nbucket_step = 16\n[[datasets]]\n"
        "[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 2\n"
        "[[datasets.subsets]]\nimage_dir = 'b'\nis_reg = true\n"
    )
    return config


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_trains_on_a_dataset_config(tmp_path: Path) -> None:
    from fastdiff import cli

    dataset = write_dataset_config(tmp_path)
    out = tmp_path / "out"
    argv = ["train", "--data", str(dataset), "--output", str(out), "--max-steps", "2", "--device", "cpu"]
    argv += ["--unet-channels", "16", "32", "--num-threads", "1", "--checkpoint-every", "0"]
    assert cli.main(argv) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["resolution"], saved["batch_size"], saved["bucket_step"]) == (32, 2, 16)  # the config's
    assert (saved["crop"], saved["flip_prob"]) == ("center", 0.0)  # neither sets them: the defaults
    assert len((out / "loss.csv").read_text().splitlines()) == 3
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    # The vocabulary holds the words of both caption sources (metadata.jsonl included).
    ids = tokenize(tokenizer, ["a yellow zebra", "a blue square, tone 2"])
    assert not (ids == tokenizer.unk_token_id).any()


def test_run_settings_win_over_the_dataset_config_and_seeds_must_agree(tmp_path: Path) -> None:
    dataset = write_dataset_config(tmp_path)
    cfg = with_dataset_options(TrainConfig(data=dataset, output=tmp_path, batch_size=3))
    assert (cfg.resolution, cfg.batch_size, cfg.bucket_step, cfg.crop) == (32, 3, 16, "center")
    loader = make_loader(cfg)
    assert (loader.batch_size, len(loader)) == (3, 3)  # 6 square: 2, 1 wide: 1
    assert loader.captions == [f"a blue square, tone {i}" for i in range(3)] + ["a yellow zebra"]
    dataset.write_text(dataset.read_text().replace("[general]\n", "[general]\nseed = 5\n"))
    with pytest.raises(ValueError, match=r"seed = 5 differs from the run's seed 0"):
        with_dataset_options(TrainConfig(data=dataset, output=tmp_path))
