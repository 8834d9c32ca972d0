"""Flow-matching DiT fine-tuning (SD3, FLUX.1 dev/schnell, Z-Image) on real wallpapers with tiny local
pipelines: LoRA that the pipeline's ``load_lora_weights`` reads, full fine-tunes that reload with
``from_pretrained``, bit-exact resume, falling loss, the families' conventions (latent normalisation,
FLUX packing and guidance, timestep inputs, SD3 without T5) and the refusals. Every pipeline is built by
``tiny_dit`` and nothing downloads.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import copy_with_captions, smallest_images, tiny_run
from diffusers import DiffusionPipeline, FluxPipeline
from fastdiff import cli
from fastdiff.training import dit, families, flow
from fastdiff.training.config import TrainConfig
from fastdiff.training.dit_pipeline import dit_family
from fastdiff.training.flags import config_from_mapping, read_train_toml
from fastdiff.training.run import train
from fastdiff.training.sd_pipeline import scale_latents
from fastdiff.training.setup import make_loader
from PIL import Image
from safetensors.torch import load_file
from tiny_dit import SEQUENCE_TOKENS, build_flux, build_sd3, build_z_image
from tiny_sd import build_sd15

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sd3": build_sd3,
    "flux": build_flux,
    "flux_schnell": lambda folder: build_flux(folder, guidance=False),
    "z_image": build_z_image,
}
FAMILIES = ("sd3", "flux", "z_image")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def images(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 6 smallest wallpapers (256-400 px) and their captions."""
    return copy_with_captions(smallest_images(wallpapers, 6), tmp_path_factory.mktemp("images"))


def config(model: Path, data: Path, output: Path, **overrides: object) -> TrainConfig:
    """3 CPU steps at resolution 32 (latents 16x16, 64 tokens), batches of 2, one loader thread."""
    return tiny_run(
        model,
        data,
        output,
        **{"max_steps": 3, "learning_rate": 1e-3, "max_sequence_length": SEQUENCE_TOKENS, **overrides},
    )


def load(model: Path) -> Any:
    pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe: Any) -> torch.Tensor:
    return pipe(
        "a wallpaper",
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=SEQUENCE_TOKENS,
        output_type="pt",
    ).images


def lora_weights(transformer: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter ``adapter``'s LoRA weights of ``transformer``, keyed without the adapter name."""
    return {k.replace(f".{adapter}.", "."): v for k, v in transformer.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_loads_into_the_pipeline_and_changes_its_output(
    name: str, pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    model = pipelines[name]
    result = train(config(model, images, tmp_path, lora_rank=4, learning_rate=1e-2, checkpoint_every=2))
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    assert result.config.lora_target_modules == dit_family(model).lora_targets  # type: ignore[union-attr]
    weights = load_file(tmp_path / dit.LORA_WEIGHTS)
    assert weights and all(k.startswith("transformer.") and ".lora_" in k for k in weights)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in weights.items()), "B is still zero"
    assert (tmp_path / "checkpoint-2" / dit.LORA_WEIGHTS).is_file()

    pipe = load(model)
    source = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    before = draw(pipe)
    pipe.load_lora_weights(tmp_path)
    after = draw(pipe)
    assert (after - before).abs().max() > 1e-3
    # The loaded adapters are the trained ones: the reloaded transformer computes what the trained one does.
    trained = result.transformer.eval()
    base = {k.replace(".base_layer", ""): v for k, v in trained.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], source[k]) for k in source), "a base weight changed"
    loaded = lora_weights(pipe.transformer, "default_0")  # load_lora_weights' adapter name
    mine = lora_weights(trained, "default")
    assert loaded.keys() == mine.keys() and all(torch.equal(loaded[k], mine[k]) for k in mine)


@pytest.mark.parametrize("name", FAMILIES)
def test_full_finetune_reloads_with_from_pretrained(
    name: str, pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    model = pipelines[name]
    result = train(config(model, images, tmp_path, lora_rank=0, max_steps=2, ema_decay=0.5))
    assert all(math.isfinite(v) for v in result.losses)
    source, saved = load(model), load(tmp_path)
    trained = result.transformer.state_dict()
    assert saved.transformer.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in saved.transformer.state_dict().items())
    original = source.transformer.state_dict()
    changed = [k for k, v in trained.items() if not torch.equal(v, original[k])]
    assert len(changed) > len(original) // 2
    for component in saved.components:
        if component == "transformer" or not isinstance(getattr(saved, component), torch.nn.Module):
            continue
        want = getattr(source, component).state_dict()
        got = getattr(saved, component).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in got.items()), f"{component} changed"


@pytest.mark.parametrize("name", FAMILIES)
def test_resume_at_step_k_reproduces_step_k_plus_1(
    name: str, pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    cfg = config(
        pipelines[name],
        images,
        tmp_path / "full",
        lora_rank=4,
        checkpoint_every=2,
        caption_dropout=0.3,
        ema_decay=0.9,
        crop="random",
        flip_prob=0.5,
        loss_weighting="cosmap",
        timestep_sampling="mode",
    )
    full = train(cfg)
    resumed = train(replace(cfg, output=tmp_path / "resumed", resume=tmp_path / "full" / "checkpoint-2"))
    assert resumed.first_step == 3 and resumed.losses == full.losses[2:]


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_lora_with_gradient_checkpointing_and_previews(
    name: str, pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    cfg = config(
        pipelines[name],
        images,
        tmp_path,
        lora_rank=4,
        max_steps=2,
        mixed_precision="bf16",
        vae_dtype="bf16",
        gradient_checkpointing=True,
        preview_every=2,
        preview_steps=2,
        preview_prompts=("a red house",),
    )
    result = train(cfg)
    assert all(math.isfinite(v) for v in result.losses) and result.skipped_steps == 0
    preview = Image.open(next((tmp_path / "previews").glob("step-000002-*x*.png")))
    assert preview.size[0] >= 2 * 32 and np.asarray(preview).std() > 0
    # Frozen base weights in bf16, the adapters (what AdamW updates) in float32.
    assert {p.dtype for p in result.transformer.parameters() if p.requires_grad} == {torch.float32}
    assert torch.bfloat16 in {p.dtype for p in result.transformer.parameters() if not p.requires_grad}


def window_means(losses: list[float], n: int) -> tuple[float, float]:
    return float(np.mean(losses[:n])), float(np.mean(losses[-n:]))


@pytest.mark.parametrize(
    ("name", "steps"),
    [
        pytest.param("flux", 60, id="flux-fast"),
        pytest.param("sd3", 150, marks=pytest.mark.slow, id="sd3"),
        pytest.param("flux", 150, marks=pytest.mark.slow, id="flux"),
        pytest.param("z_image", 150, marks=pytest.mark.slow, id="z_image"),
    ],
)
def test_loss_falls_by_30_percent_on_real_images(
    name: str, steps: int, pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    # t concentrated around 0.5 (logit-normal, std 0.3, no shift): uniform t would make the curve noisy.
    cfg = config(
        pipelines[name],
        images,
        tmp_path,
        lora_rank=0,
        max_steps=steps,
        learning_rate=5e-3,
        caption_dropout=0.0,
        timestep_sampling="logit_normal",
        logit_std=0.3,
        timestep_shift=1.0,
    )
    result = train(cfg)
    first, last = window_means(result.losses, 10)
    assert last < 0.7 * first, (first, last)


def test_flux_packing_is_a_bitwise_round_trip_through_the_pipelines_helpers() -> None:
    latents = torch.randn(2, 16, 12, 20, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(latents, 2, 16, 12, 20)
    assert packed.shape == (2, 6 * 10, 64)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 12 * 8, 20 * 8, 8), latents)

    # The FLUX preset packs the input and unpacks the output with them: an identity transformer
    # gives the latents back bit for bit, with the img_ids of the packed grid.
    seen: dict[str, torch.Tensor] = {}

    class Identity(torch.nn.Module):
        config = type("Config", (), {"guidance_embeds": True})()

        def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
            seen.update(kwargs)
            return (hidden_states,)

    inputs = families.PredictInputs(torch.full((2,), 0.5), {}, vae_scale_factor=8, guidance=3.5)
    out = families.FAMILIES["FluxPipeline"].predict(Identity(), latents, inputs)
    assert torch.equal(out, latents)
    assert seen["img_ids"].shape == (60, 3) and seen["img_ids"][-1].tolist() == [0, 5, 9]
    assert seen["guidance"].tolist() == [3.5, 3.5] and seen["timestep"].tolist() == [0.5, 0.5]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_latent_normalisation_matches_the_pipelines_decode_path(
    name: str, pipelines: dict[str, Path], images: Path
) -> None:
    pipe = load(pipelines[name])
    vae = pipe.vae
    assert vae.config.shift_factor != 0 and vae.config.scaling_factor != 1  # the real families' factors
    path = sorted(images.glob("*.jpg"))[0]
    pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB").resize((32, 32))).copy())
    pixels = pixels.permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mean
        normalised = scale_latents(vae.config, z)
        # What the pipeline does before decoding its sampled latents.
        denormalised = normalised / vae.config.scaling_factor + vae.config.shift_factor
        torch.testing.assert_close(denormalised, z, rtol=1e-6, atol=1e-6)
        round_trip = vae.decode(z).sample
        through = vae.decode(denormalised).sample
    torch.testing.assert_close(through, round_trip, rtol=1e-5, atol=1e-5)
    assert (normalised - z).abs().max() > 0.01  # the factors did something


def capture_transformer(task: dit.DiTTask) -> tuple[dict[str, Any], Any]:
    seen: dict[str, Any] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["args"], seen["kwargs"] = args, kwargs

    return seen, task.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_each_family_gets_t_in_its_pipelines_convention(pipelines: dict[str, Path], images: Path) -> None:
    for name in FAMILIES:
        family = dit_family(pipelines[name])
        assert family is not None
        task = dit.DiTTask.from_config(config(pipelines[name], images, Path()), torch.device("cpu"), family)
        batch = next(iter(make_loader(task.config)))
        seen, handle = capture_transformer(task)
        task.loss(batch, generator=torch.Generator().manual_seed(0), amp_dtype=None)
        handle.remove()
        # The loss's draws in its order: the VAE posterior, the noise, then t, shifted by the
        # scheduler's shift for the batch's image token count.
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            latents = task.vae.encode(batch["pixel_values"]).latent_dist.sample(generator=generator)
        torch.randn(latents.shape, generator=generator)
        sampling = task.config.timestep_sampling
        assert sampling == family.sampling
        t = flow.sample_timesteps(len(latents), sampling, generator=generator, device=torch.device("cpu"))
        tokens = latents.shape[-2] * latents.shape[-1] // 4
        shift = flow.timestep_shift(task.scheduler_config, tokens, None)
        if name == "flux":  # FLUX.1's dynamic shift: exp(mu) for this token count
            assert shift == pytest.approx(math.exp(flow.resolution_mu(tokens, task.scheduler_config)))
        else:
            assert shift == 3.0
        sigmas = flow.shift_timesteps(t, shift)
        if name == "sd3":
            torch.testing.assert_close(seen["kwargs"]["timestep"], sigmas * 1000)
        elif name == "flux":
            torch.testing.assert_close(seen["kwargs"]["timestep"], sigmas)
            assert seen["kwargs"]["guidance"].tolist() == [3.5] * len(latents)
        else:
            torch.testing.assert_close(seen["args"][1], 1 - sigmas)


def test_flux_dev_and_schnell_defaults_follow_the_guidance_embedding(
    pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    for name, length, has_guidance in (("flux", 512, True), ("flux_schnell", 256, False)):
        model = pipelines[name]
        family = dit_family(model)
        assert family is not None and family.name == "flux"
        cfg = dit.with_model_defaults(
            replace(config(model, images, tmp_path), max_sequence_length=None), family
        )
        assert cfg.max_sequence_length == length and cfg.timestep_sampling == "uniform"
        task = dit.DiTTask.from_config(config(model, images, tmp_path), torch.device("cpu"), family)
        seen, handle = capture_transformer(task)
        loss = task.loss(next(iter(make_loader(task.config))), generator=torch.Generator(), amp_dtype=None)
        handle.remove()
        assert math.isfinite(loss.item())
        assert (seen["kwargs"]["guidance"] is not None) == has_guidance
        assert seen["kwargs"]["txt_ids"].shape == (SEQUENCE_TOKENS, 3)


def test_sd3_without_t5_encodes_zeros_for_its_part_and_saves_a_whole_pipeline(
    pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    argv = ["train", "--model", str(pipelines["sd3"]), "--data", str(images), "--output", str(tmp_path)]
    argv += ["--resolution", "32", "--bucket-step", "8", "--batch-size", "2", "--max-steps", "2"]
    argv += ["--learning-rate", "0.001", "--no-t5", "--max-sequence-length", str(SEQUENCE_TOKENS)]
    argv += [
        "--loss-weighting",
        "sigma_sqrt",
        "--timestep-shift",
        "2",
        "--num-threads",
        "1",
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 0
    saved = load(tmp_path)
    assert saved.text_encoder_3 is not None  # left out of training, saved as it was
    family = dit_family(pipelines["sd3"])
    assert family is not None
    cfg = config(pipelines["sd3"], images, tmp_path, t5=False)
    task = dit.DiTTask.from_config(cfg, torch.device("cpu"), family)
    assert task.pipeline.text_encoder_3 is None
    conditioning = family.encode(task.pipeline, ["a red house"], SEQUENCE_TOKENS, torch.device("cpu"))
    embeds = conditioning["encoder_hidden_states"]
    clip_tokens = task.pipeline.tokenizer.model_max_length
    assert embeds.shape == (1, clip_tokens + SEQUENCE_TOKENS, 64)
    assert not embeds[:, clip_tokens:].any() and embeds[:, :clip_tokens].abs().sum() > 0
    assert conditioning["pooled_projections"].shape == (1, 64)

    # A folder without T5 (often deleted to save disk) trains with --no-t5 and saves without it.
    no_t5 = tmp_path / "no-t5"
    shutil.copytree(pipelines["sd3"], no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    with pytest.raises(ValueError, match="lacks text_encoder_3/, tokenizer_3/"):
        train(config(no_t5, images, tmp_path / "out", max_steps=1))
    train(config(no_t5, images, tmp_path / "out", t5=False, max_steps=1))
    # Loaded as diffusers loads SD3 without T5: text_encoder_3 is not an optional component.
    saved_no_t5 = DiffusionPipeline.from_pretrained(
        tmp_path / "out", text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    assert saved_no_t5.text_encoder_3 is None and saved_no_t5.transformer is not None


def test_a_bucket_step_that_does_not_fit_the_model_is_refused_with_both_numbers(
    pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    model = pipelines["flux"]
    family = dit_family(model)
    assert family is not None
    assert dit.alignment(model, family) == 4  # the tiny VAE's 2 x the 2x2 packing
    with pytest.raises(ValueError, match=r"bucket_step \(6\) must be a multiple of 4"):
        dit.with_model_defaults(config(model, images, tmp_path, bucket_step=6), family)
    # Defaults: 64 (a multiple of 4); FLUX.1's native 1024 px, SD3's transformer sample_size x 2.
    unset = {"bucket_step": None, "resolution": None}
    resolved = dit.with_model_defaults(config(model, images, tmp_path, **unset), family)
    assert resolved.bucket_step == 64 and resolved.resolution == 1024
    sd3, sd3_family = pipelines["sd3"], dit_family(pipelines["sd3"])
    assert sd3_family is not None
    assert dit.with_model_defaults(config(sd3, images, tmp_path, **unset), sd3_family).resolution == 32


def test_unsupported_and_misplaced_settings_are_refused(
    pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    flux = pipelines["flux"]
    family = dit_family(flux)
    assert family is not None
    with pytest.raises(ValueError, match="train_text_encoder: not supported for FluxPipeline"):
        dit.with_model_defaults(config(flux, images, tmp_path, train_text_encoder=True), family)
    with pytest.raises(ValueError, match="snr_gamma: not supported"):
        dit.with_model_defaults(config(flux, images, tmp_path, snr_gamma=5.0), family)
    with pytest.raises(ValueError, match="--no-t5: FluxPipeline needs all its text encoders"):
        dit.with_model_defaults(config(flux, images, tmp_path, t5=False), family)
    # Flow-matching settings for a UNet, or from scratch.
    sd15 = build_sd15(tmp_path / "sd15")
    with pytest.raises(ValueError, match="loss_weighting applies to flow-matching DiT pipelines"):
        train(config(sd15, images, tmp_path, max_sequence_length=None, loss_weighting="cosmap"))
    with pytest.raises(ValueError, match="timestep_shift needs a flow-matching DiT"):
        TrainConfig(data=images, output=tmp_path, timestep_shift=3.0)


def test_example_config_trains_the_tiny_flux_with_its_flow_settings(
    pipelines: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    values = read_train_toml(REPO / "examples" / "flux_lora.toml")
    assert values["timestep_sampling"] == "uniform" and values["guidance"] == 3.5
    # The example's settings on the tiny FLUX pipeline, 1 CPU step at 32 px.
    small = {"resolution": 32, "bucket_step": 8, "max_steps": 1, "batch_size": 2, "max_sequence_length": 24}
    overrides = {"model": pipelines["flux"], "data": images, "output": tmp_path, "device": "cpu", **small}
    cfg = config_from_mapping(
        {**values, **overrides, "mixed_precision": "no", "gradient_accumulation_steps": 1}
    )
    result = train(replace(cfg, preview_every=0, num_threads=1))
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
