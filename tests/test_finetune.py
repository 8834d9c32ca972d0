"""Stable Diffusion fine-tuning on real wallpapers with tiny local SD 1.x and SDXL pipelines.

Full and LoRA fine-tunes, the LoRA file loading into a pipeline, bit-exact resume, the non-finite
guard, min-SNR weights against the paper's formula, SDXL micro-conditioning from the loader, the CLI
names and the TOML config. Every pipeline is built by ``tiny_sd`` and nothing downloads.
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from conftest import copy_with_captions, smallest_images, tiny_run
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from fastdiff import cli
from fastdiff.training import loop, objective, sd, sd_pipeline
from fastdiff.training.config import TrainConfig
from fastdiff.training.flags import config_from_args, config_from_mapping, read_train_toml
from fastdiff.training.protocols import BatchLoader
from fastdiff.training.run import train
from fastdiff.training.setup import make_loader
from fastdiff.types import Batch
from safetensors.torch import load_file, save_file
from tiny_sd import build_sd15, build_sdxl

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def images(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 6 smallest wallpapers (256-400 px) and their captions."""
    return copy_with_captions(smallest_images(wallpapers, 6), tmp_path_factory.mktemp("images"))


def config(model: Path, data: Path, output: Path, **overrides: object) -> TrainConfig:
    """3 CPU steps at resolution 32 (latents 16x16), batches of 2, one loader thread."""
    return tiny_run(model, data, output, **{"max_steps": 3, "learning_rate": 1e-2, **overrides})


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def without_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft-adapted state dict's base weights under their original names."""
    return {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}


def test_full_finetune_changes_the_unet_only_and_saves_a_loadable_pipeline(
    sd15: Path, images: Path, tmp_path: Path
) -> None:
    # bf16 autocast and a bf16 VAE (frozen text encoder held in bf16 too): what is saved is float32.
    result = train(config(sd15, images, tmp_path, lora_rank=0, mixed_precision="bf16", vae_dtype="bf16"))
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    rows = read_csv(tmp_path / "loss.csv")
    assert rows[0] == ["step", "loss", "grad_norm", "lr"] and [r[0] for r in rows[1:]] == ["1", "2", "3"]
    assert (tmp_path / "loss.png").is_file()

    source = UNet2DConditionModel.from_pretrained(sd15 / "unet")
    saved = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, local_files_only=True)
    changed = [k for k, v in saved.unet.state_dict().items() if not torch.equal(v, source.state_dict()[k])]
    assert len(changed) > len(source.state_dict()) // 2
    assert saved.unet.dtype == saved.vae.dtype == saved.text_encoder.dtype == torch.float32
    for name in ("text_encoder", "vae"):
        original = type(getattr(saved, name)).from_pretrained(sd15 / name).state_dict()
        for key, value in getattr(saved, name).state_dict().items():
            assert torch.equal(value, original[key]), f"{name}.{key} changed"


def test_lora_via_cli_writes_an_adapter_that_load_lora_weights_reads_and_that_changes_the_output(
    sd15: Path, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = ["train", "--model", str(sd15), "--data", str(images), "--output", str(out)]
    argv += ["--resolution", "32", "--bucket-step", "8", "--batch-size", "2", "--max-steps", "3"]
    argv += ["--learning-rate", "0.01", "--lora-rank", "4", "--mixed-precision", "no"]
    argv += ["--checkpoint-every", "2", "--seed", "1", "--num-threads", "1", "--device", "cpu"]
    assert cli.main(argv) == 0
    adapter = out / "pytorch_lora_weights.safetensors"
    weights = load_file(adapter)
    # diffusers' format: `unet.` prefix, A as `lora.down`, B (zero at init) as `lora.up`.
    assert weights and all(
        k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in weights
    )
    assert any(".lora.up." in k and v.abs().max() > 0 for k, v in weights.items()), "B is still zero"
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert len(read_csv(out / "loss.csv")) == 4

    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def draw() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a wallpaper", height=32, width=32, num_inference_steps=3, generator=generator, output_type="pt"
        ).images

    before = draw()
    pipe.load_lora_weights(out)
    after = draw()
    assert (after - before).abs().max() > 1e-3


def test_lora_trains_only_the_adapters_and_diffusers_loads_them_to_the_same_unet(
    sd15: Path, images: Path, tmp_path: Path
) -> None:
    result = train(config(sd15, images, tmp_path, lora_rank=4, lora_alpha=8.0, max_steps=2))
    trained = result.pipeline
    assert all(math.isfinite(v) for v in result.losses)
    # Only adapter weights moved: every base weight of the trained pipeline is the source's.
    source = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, local_files_only=True)
    state = trained.unet.state_dict()
    base, original = without_lora(state), source.unet.state_dict()
    assert base.keys() == original.keys()
    assert all(torch.equal(base[k], original[k]) for k in original)
    ups = [v for k, v in state.items() if ".lora_B." in k]
    assert ups and all(v.abs().max() > 0 for v in ups)  # B starts at zero
    for name in ("text_encoder", "vae"):
        want = getattr(source, name).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in getattr(trained, name).state_dict().items())

    source.load_lora_weights(tmp_path)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = trained.unet.eval()(x, 10, encoder_hidden_states=text).sample
        got = source.unet(x, 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_lora_initialisation_is_a_function_of_the_seed(sd15: Path, images: Path, tmp_path: Path) -> None:
    def downs(seed: int) -> dict[str, torch.Tensor]:
        task = sd.PipelineTask.from_config(
            config(sd15, images, tmp_path, lora_rank=4, seed=seed), torch.device("cpu")
        )
        return {k: v for k, v in task.unet.state_dict().items() if ".lora_A." in k}

    torch.manual_seed(123)  # the caller's generator state neither matters nor changes
    state = torch.get_rng_state()
    first, again, other = downs(0), downs(0), downs(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def test_resume_from_checkpoint_reproduces_the_next_steps_exactly(
    sd15: Path, images: Path, tmp_path: Path
) -> None:
    # Everything random at once: crops, flips, caption dropout, EMA, min-SNR, offset noise, input
    # perturbation, 2 batches per step (6 batches cross an epoch: 3 batches per epoch).
    cfg = config(
        sd15,
        images,
        tmp_path / "full",
        lora_rank=4,
        max_steps=3,
        checkpoint_every=2,
        gradient_accumulation_steps=2,
        crop="random",
        flip_prob=0.5,
        caption_dropout=0.3,
        ema_decay=0.9,
        snr_gamma=5.0,
        noise_offset=0.05,
        input_perturbation=0.1,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
    )
    full = train(cfg)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoint-2").iterdir()) == [
        "loader.json",
        "pytorch_lora_weights.safetensors",
        "train_config.json",
        "trainable.safetensors",
        "training_state.pt",
    ]
    # The checkpoint's adapter (for users) is the EMA weights; its trainable file (for resuming) the raw.
    checkpoint = tmp_path / "full" / "checkpoint-2"
    adapter, raw = (
        load_file(checkpoint / "pytorch_lora_weights.safetensors"),
        load_file(checkpoint / "trainable.safetensors"),
    )
    ups = [k for k in adapter if k.endswith(".lora.up.weight")]  # diffusers' names of peft's lora_B
    assert ups and all(k.replace(".lora.up.", ".lora_B.default.") in raw for k in ups)
    assert not any(torch.equal(adapter[k], raw[k.replace(".lora.up.", ".lora_B.default.")]) for k in ups)
    resumed = train(replace(cfg, output=tmp_path / "resumed", resume=checkpoint))
    assert resumed.first_step == 3
    assert resumed.losses == full.losses[2:]  # exact, not approximate
    assert read_csv(tmp_path / "resumed" / "loss.csv") == [
        ["step", "loss", "grad_norm", "lr"],
        read_csv(tmp_path / "full" / "loss.csv")[3],
    ]
    want = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    got = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # Resuming into the run's own output (folder of checkpoints: the latest is taken) keeps rows 1-2.
    again = train(replace(cfg, resume=tmp_path / "full"))
    assert again.losses == full.losses[2:]
    assert [r[0] for r in read_csv(tmp_path / "full" / "loss.csv")] == ["step", "1", "2", "3"]

    with pytest.raises(ValueError, match="lora_rank"):
        train(replace(cfg, output=tmp_path / "x", lora_rank=8, resume=tmp_path / "full" / "checkpoint-2"))


class PoisonLoader:
    """Wraps a loader; the batches of the given steps (1-based, one batch per step) become NaN."""

    def __init__(self, inner: BatchLoader, bad_steps: set[int]) -> None:
        self.inner, self.bad_steps, self.count = inner, bad_steps, 0

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.inner:
            self.count += 1
            if self.count in self.bad_steps:
                batch = {**batch, "pixel_values": torch.full_like(batch["pixel_values"], float("nan"))}
            yield batch


def test_nan_batch_is_skipped_counted_logged_and_leaves_the_weights_unchanged(
    sd15: Path, images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one = config(sd15, images, tmp_path / "one", max_steps=1)
    reference = train(one)
    two = replace(one, output=tmp_path / "two", max_steps=2)
    with caplog.at_level(logging.WARNING, logger="fastdiff.train"):
        poisoned = train(two, loader=PoisonLoader(make_loader(poisoned_config(two)), {2}))
    assert poisoned.skipped_steps == 1
    assert poisoned.losses[0] == reference.losses[0] and math.isnan(poisoned.losses[1])
    assert read_csv(tmp_path / "two" / "loss.csv")[2] == ["2", "nan", "nan", "0.01"]
    assert "step 2 skipped: non-finite loss" in caplog.text and str(images) in caplog.text
    want, got = reference.unet.state_dict(), poisoned.unet.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)

    stop = replace(one, output=tmp_path / "stop", max_steps=5, max_consecutive_skips=2)
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        train(stop, loader=PoisonLoader(make_loader(poisoned_config(stop)), {1, 2, 3}))


def poisoned_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the pipeline defaults that :func:`fastdiff.training.setup.make_loader` needs filled in."""
    return cfg.resolved(resolution=32, bucket_step=8)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_hang_et_al_2023(prediction_type: str) -> None:
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    timesteps = torch.tensor([0, 50, 200, 500, 999])
    gamma = 5.0
    alpha_bar = scheduler.alphas_cumprod.double()[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    # Hang et al. 2023: w = min(SNR, γ) / SNR on the ε loss; min(SNR, γ) / (SNR + 1) on the v loss.
    expected = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    weights = objective.min_snr_weights(scheduler, timesteps, gamma)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=0)
    assert snr[0] > gamma and snr[-1] < gamma  # both branches of the min are exercised
    if prediction_type == "epsilon":
        assert weights[-1] == 1.0 and weights[0] < 0.01


def test_min_snr_weight_is_finite_at_zero_terminal_snr() -> None:
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    weights = objective.min_snr_weights(scheduler, torch.tensor([999]), 5.0)
    assert weights.tolist() == [1.0]


def test_weighted_mse_weights_each_samples_mean() -> None:
    pred, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert objective.weighted_mse(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx(
        (1 + 0.5 * 4) / 2
    )
    assert objective.weighted_mse(pred, target, None).item() == pytest.approx(2.5)


def test_sdxl_uses_both_encoders_and_add_time_ids_from_the_loader(
    sdxl: Path, images: Path, tmp_path: Path
) -> None:
    cfg = config(sdxl, images, tmp_path, lora_rank=4, mixed_precision="bf16", flip_prob=0.5, crop="random")
    task = sd.PipelineTask.from_config(cfg, torch.device("cpu"))
    assert task.sdxl and task.config.prediction_type == "epsilon"
    batch = next(iter(make_loader(task.config)))
    seen: dict[str, torch.Tensor] = {}

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["time_ids"] = kwargs["added_cond_kwargs"]["time_ids"]
        seen["text_embeds"] = kwargs["added_cond_kwargs"]["text_embeds"]
        seen["hidden"] = kwargs["encoder_hidden_states"]

    handle = task.unet.register_forward_pre_hook(capture, with_kwargs=True)
    loss = task.loss(batch, generator=torch.Generator().manual_seed(0), amp_dtype=torch.bfloat16)
    handle.remove()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    expected = [
        [*o, *c, *t]
        for o, c, t in zip(
            batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"], strict=True
        )
    ]
    assert seen["time_ids"].tolist() == expected
    assert seen["hidden"].shape[-1] == 64  # 32 + 32: both encoders' penultimate states
    assert seen["text_embeds"].shape == (len(batch["captions"]), 32)
    # A dropped caption is SDXL's unconditional input, zeros (force_zeros_for_empty_prompt); an
    # empty caption that was not dropped is encoded as "".
    assert task.zero_dropped_captions
    b = len(batch["captions"])
    dropped = [i == 0 for i in range(b)]
    batch = {**batch, "captions": [""] * b, "captions_dropped": dropped}
    handle = task.unet.register_forward_pre_hook(capture, with_kwargs=True)
    task.loss(batch, generator=torch.Generator().manual_seed(0), amp_dtype=torch.bfloat16)
    handle.remove()
    assert not seen["hidden"][0].any() and not seen["text_embeds"][0].any()
    assert all(
        seen["hidden"][i].abs().sum() > 0 and seen["text_embeds"][i].abs().sum() > 0 for i in range(1, b)
    )
    # The frozen base weights went to bf16, the adapters stay float32 for AdamW.
    assert {p.dtype for p in task.trainable().values()} == {torch.float32}

    # Adapters on both text encoders too: all three land in the file, and diffusers reads it back.
    result = train(replace(cfg, max_steps=2, train_text_encoder=True))
    assert all(math.isfinite(v) for v in result.losses)
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert {k.split(".", 1)[0] for k in saved} == {"unet", "text_encoder", "text_encoder_2"}
    assert not any(".default." in k for k in saved)
    if transformers_reads_text_encoder_lora():
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl, local_files_only=True)
        pipe.load_lora_weights(tmp_path)
        assert any("lora_" in k for k in pipe.text_encoder_2.state_dict())


def transformers_reads_text_encoder_lora() -> bool:
    """Whether diffusers can load text-encoder LoRA here (through transformers' PEFT integration, whose
    minimum peft version transformers 5 raised to 0.22)."""
    import peft
    from packaging.version import Version
    from transformers.integrations import peft as transformers_peft

    minimum = getattr(transformers_peft, "MIN_PEFT_VERSION", "0.0")
    return Version(peft.__version__) >= Version(minimum)


def test_sdxl_full_finetune_with_previews(sdxl: Path, images: Path, tmp_path: Path) -> None:
    cfg = config(
        sdxl,
        images,
        tmp_path,
        max_steps=2,
        preview_every=2,
        preview_steps=2,
        ema_decay=0.5,
        gradient_checkpointing=True,
    )
    result = train(cfg)
    assert all(math.isfinite(v) for v in result.losses)
    assert list((tmp_path / "previews").glob("step-000002-*x*.png"))  # a grid per size
    assert (tmp_path / "text_encoder_2" / "model.safetensors").is_file()
    source = UNet2DConditionModel.from_pretrained(sdxl / "unet").state_dict()
    assert any(not torch.equal(v, source[k]) for k, v in result.unet.state_dict().items())


def test_model_path_errors_are_clear(tmp_path: Path, sd15: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd_pipeline.pipeline_kind(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unknown layout"):
        sd_pipeline.pipeline_kind(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown layout"):
        sd_pipeline.pipeline_kind(tmp_path / "weights.bin")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ValueError, match="FluxPipeline"):
        sd_pipeline.pipeline_kind(other)
    broken = tmp_path / "broken"
    shutil.copytree(sd15, broken, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ValueError, match="vae/"):
        sd_pipeline.pipeline_kind(broken)
    assert sd_pipeline.pipeline_kind(sd15) == "sd"
    single = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, single)
    with pytest.raises(ValueError, match="needs --model-config"):
        sd_pipeline.pipeline_kind(single)
    assert sd_pipeline.pipeline_kind(single, sd15) == "sd"
    with pytest.raises(ValueError, match=r"model\.safetensors: could not load"):
        sd_pipeline.load_pipeline(single, sd15)


def test_lr_schedules_warm_up_then_hold_or_decay() -> None:
    def lrs(name: str) -> list[float]:
        cfg = TrainConfig(
            data=Path(), output=Path(), learning_rate=1.0, lr_scheduler=name, lr_warmup_steps=2, max_steps=6
        )
        optimizer = loop.make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
        scheduler = loop.make_lr_scheduler(optimizer, cfg)
        out = []
        for _ in range(6):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    assert lrs("constant") == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert lrs("linear") == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    assert lrs("cosine") == pytest.approx([0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466])


def test_8bit_adam_without_bitsandbytes_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    cfg = TrainConfig(data=Path(), output=Path(), learning_rate=1e-4, use_8bit_adam=True)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        loop.make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)


def test_from_scratch_fields_are_refused_with_a_model() -> None:
    with pytest.raises(ValueError, match="unet_channels"):
        TrainConfig(data=Path(), output=Path(), model=Path("m"), unet_channels=(16, 32))
    with pytest.raises(ValueError, match="lora_rank"):
        TrainConfig(data=Path(), output=Path(), lora_rank=4)
    with pytest.raises(ValueError, match="vae_dtype"):
        TrainConfig(data=Path(), output=Path(), model=Path("m"), vae_dtype="fp16")


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_every_flag_is_a_toml_key_and_unknown_keys_are_named(tmp_path: Path) -> None:
    non_default = {
        "model": "m",
        "model_config": "mc",
        "resume": "r",
        "cache": "c",
        "resolution": 48,
        "bucket_step": 8,
        "min_bucket_side": 16,
        "max_bucket_side": 64,
        "crop": "random",
        "flip_prob": 0.5,
        "crop_variants": 2,
        "text_variants": 2,
        "batch_size": 3,
        "learning_rate": 0.5,
        "prediction_type": "v_prediction",
        "snr_gamma": 5.0,
        "lora_alpha": 2.0,
        "num_threads": 1,
        "torch_threads": 1,
        "lora_target_modules": ("to_q", "to_v"),
        "timestep_sampling": "mode",
        "timestep_shift": 3.0,
        "max_sequence_length": 77,
        "validation_split": 0.1,
        "min_bucket_fill": 4,
        "max_extra_crop": 0.2,
        "resolution_schedule": "32:2,64",
    }
    values = {
        f.name: non_default.get(f.name, f.default)
        for f in fields(TrainConfig)
        if f.name not in ("data", "output")
    }
    assert all(v is not None for v in values.values())
    lines = ['data = "d"', 'output = "o"'] + [
        f"{k.replace('_', '-')} = {toml_value(v)}" for k, v in values.items()
    ]
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    parsed = read_train_toml(path)
    assert set(parsed) == {f.name for f in fields(TrainConfig)}
    assert parsed["data"] == tmp_path / "d" and parsed["lora_target_modules"] == list(
        values["lora_target_modules"]
    )

    (tmp_path / "bad.toml").write_text('data = "d"\nmax-step = 3\n')
    with pytest.raises(ValueError, match="'max-step'"):
        read_train_toml(tmp_path / "bad.toml")


def test_cli_flags_win_over_the_toml_file(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(
        'data = "data"\noutput = "out"\nmax-steps = 9\nlora_rank = 4\nmodel = "m"\n'
    )
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--config", str(tmp_path / "run.toml"), "--max-steps", "2"])
    cfg = config_from_args(args)
    assert (cfg.max_steps, cfg.lora_rank, cfg.data, cfg.model) == (2, 4, tmp_path / "data", tmp_path / "m")
    with pytest.raises(ValueError, match="--output is required"):
        config_from_args(parser.parse_args(["train", "--data", "d"]))


def test_example_config_is_valid() -> None:
    path = REPO / "examples" / "sd15_lora.toml"
    cfg = config_from_mapping(read_train_toml(path))
    assert cfg.model is not None and cfg.lora_rank > 0 and cfg.max_steps > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mixed_precision", ["fp16", "bf16"])
def test_amp_lora_on_cuda(sd15: Path, images: Path, tmp_path: Path, mixed_precision: str) -> None:
    cfg = config(
        sd15, images, tmp_path, lora_rank=4, mixed_precision=mixed_precision, device="cuda", max_steps=4
    )
    result = train(replace(cfg, ema_decay=0.9, checkpoint_every=2))
    assert result.device.type == "cuda"
    assert all(math.isfinite(v) for v in result.losses)
    assert result.skipped_steps == 0
    assert {p.dtype for p in sd.lora_layers(result.unet).values()} == {torch.float32}
    # Resuming puts the EMA averages (loaded on the CPU) back on the GPU.
    resumed = train(
        replace(cfg, ema_decay=0.9, output=tmp_path / "resumed", resume=tmp_path / "checkpoint-2")
    )
    assert resumed.first_step == 3 and all(math.isfinite(v) for v in resumed.losses)


def test_subset_loss_weights_multiply_each_samples_loss_with_min_snr() -> None:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([10, 900])
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    noised = objective.Noised(noisy=torch.zeros_like(target), timesteps=timesteps, target=target)
    pred = torch.zeros_like(target)
    snr_w = objective.min_snr_weights(scheduler, timesteps, 5.0)
    # Per-sample MSEs are 1 and 4; the reg sample (second) has loss_weight 0.25.
    got = objective.diffusion_loss_from(scheduler, noised, pred, 5.0, torch.tensor([1.0, 0.25]))
    assert got.item() == pytest.approx((snr_w[0] * 1 + snr_w[1] * 0.25 * 4).item() / 2)
    # All-ones weights are exactly the unweighted loss.
    plain = objective.diffusion_loss_from(scheduler, noised, pred, None)
    ones = objective.diffusion_loss_from(scheduler, noised, pred, None, torch.ones(2))
    assert ones.item() == plain.item() == 2.5
