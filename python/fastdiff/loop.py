"""Training mechanics shared by ``fastdiff train``'s two model paths (from scratch, and Stable Diffusion).

What a step *computes* belongs to a :class:`Task` (the tiny pixel-space model in ``fastdiff.train``,
Stable Diffusion 1.x/2.x/SDXL in ``fastdiff.sd``); this module does everything around it, once, for
both: caption dropout, the noising helpers (noise offset, input perturbation, min-SNR-γ weights),
AdamW (optionally 8-bit), LR schedule with warmup, gradient accumulation, mixed precision with a
gradient scaler, gradient clipping, the non-finite guard, EMA, ``loss.csv``, previews, and checkpoints
from which ``--resume`` continues bit-exactly. It must not know about UNets, VAEs or tokenizers.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from fastdiff.train import BatchLoader, TrainConfig

log = logging.getLogger("fastdiff.train")

Batch = dict[str, Any]

#: Files of a checkpoint folder ``OUTPUT/checkpoint-STEP/``.
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "training_state.pt"
LOADER_FILE = "loader.json"
CONFIG_FILE = "train_config.json"
#: Settings that must be the same in a resumed run as in the run that wrote the checkpoint.
RESUME_MUST_MATCH = (
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "train_text_encoder",
    "batch_size",
    "gradient_accumulation_steps",
    "mixed_precision",
    "use_8bit_adam",
    "ema_decay",
    "lr_scheduler",
)
#: Images per prompt in a preview grid (seeds ``seed``, ``seed + 1``, ...).
PREVIEW_SEEDS = 2


class Task(Protocol):
    """The model side of a run: what is trained, how a batch's loss is computed, how it is saved."""

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the optimizer updates, by a stable name (checkpoint keys), in a fixed order."""
        ...

    def train_mode(self, on: bool) -> None:
        """Put the trained modules in train (``True``) or eval mode."""
        ...

    def loss(
        self, batch: Batch, *, generator: torch.Generator, amp_dtype: torch.dtype | None
    ) -> torch.Tensor:
        """The (weighted) diffusion loss of ``batch``, a float32 scalar; noise drawn from ``generator``."""
        ...

    def preview(self, prompts: Sequence[str], *, seeds: Sequence[int], steps: int) -> torch.Tensor:
        """One image per (prompt, seed), prompt-major: float32 ``[P * S, 3, H, W]`` in ``[0, 1]``, CPU."""
        ...

    def save(self, output: Path) -> None:
        """Write the trained weights (or adapter) into ``output``."""
        ...


class Noised(NamedTuple):
    """One forward-noising draw (see :func:`add_training_noise`)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


@dataclass
class LoopResult:
    """What :func:`run` did.

    Attributes:
        losses: Loss of every step this process ran, in order (``nan``/``inf`` where skipped); with
            gradient accumulation the mean of the step's micro-batch losses.
        first_step: Number of the first of them (1, or the checkpoint's step + 1 on resume).
        skipped_steps: Steps (of the whole run, resumed ones included) whose loss or gradients were not
            finite and that did not update the weights.
        overflow_steps: fp16 steps that ``GradScaler`` skipped because the scaled gradients overflowed
            (normal while it calibrates its scale; not counted in ``skipped_steps``).
        seconds: Wall time of the loop in seconds.
        data_seconds: Part of ``seconds`` spent waiting for the loader's next batch (each step's loss
            is read back with ``.item()``, so on CUDA the GPU work of a step is inside its own time).
    """

    losses: list[float]
    first_step: int
    skipped_steps: int
    overflow_steps: int
    seconds: float
    data_seconds: float = 0.0


def add_training_noise(
    x0: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    *,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
) -> Noised:
    """Noise clean samples at uniformly drawn timesteps and give the network's regression target.

    Draws ε ~ N(0, I) and t ~ U{0..T-1} per sample (in that order, from ``generator``) and forms
    ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` (DDPM, Ho et al. 2020, arXiv:2006.11239). Options:

    - ``noise_offset``: ε += offset · n with n ~ N(0, 1) per sample and channel (shape ``[B, C, 1, 1]``),
      which lets the model change an image's mean brightness (N. Guttenberg, "Diffusion with offset
      noise", crosslabs.org, 2023).
    - ``input_perturbation``: ``x_t`` is formed with ε + γ·n instead of ε while the target keeps ε
      (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models",
      arXiv:2301.11706).

    Args:
        x0: Clean samples (pixels in ``[-1, 1]`` or scaled VAE latents), float ``[B, C, H, W]``.
        noise_scheduler: The training schedule (``num_train_timesteps``, ``prediction_type``).
        generator: Source of every random draw, on ``x0``'s device.
        noise_offset: Offset-noise strength (0: off).
        input_perturbation: Input-perturbation strength γ (0: off).

    Returns:
        ``noisy`` (``x_t``, like ``x0``), ``timesteps`` (int64 ``[B]``) and ``target``: ε for
        ``prediction_type="epsilon"``, ``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0`` for ``"v_prediction"``
        (Salimans & Ho 2022, arXiv:2202.00512).

    Raises:
        ValueError: Another ``prediction_type``.
    """
    device = x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (x0.shape[0],), generator=generator, device=device)
    if noise_offset:
        offset = torch.randn((*x0.shape[:2], 1, 1), generator=generator, device=device, dtype=x0.dtype)
        noise = noise + noise_offset * offset
    if input_perturbation:
        extra = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        noisy = noise_scheduler.add_noise(x0, noise + input_perturbation * extra, timesteps)
    else:
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, timesteps)
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return Noised(noisy, timesteps, target)


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", arXiv:2303.09556; the v-prediction form as in their code and diffusers' examples).

    With ``SNR(t) = ᾱ_t / (1 - ᾱ_t)`` (diffusers' ``compute_snr``), the weight on the MSE of a
    prediction is ``min(SNR, γ) / SNR`` for ε-prediction and ``min(SNR, γ) / (SNR + 1)`` for
    v-prediction: both equal ``min(SNR, γ)`` as a weight on the x_0 error. For ε at ``SNR = 0``
    (zero-terminal-SNR schedules) the weight is its limit, 1.

    Args:
        noise_scheduler: The training schedule (``alphas_cumprod``, ``prediction_type``).
        timesteps: int64 ``[B]``.
        gamma: γ > 0 (the paper uses 5).

    Returns:
        float32 ``[B]`` on ``timesteps``' device.

    Raises:
        ValueError: ``gamma <= 0`` or an unknown ``prediction_type``.
    """
    from diffusers.training_utils import compute_snr

    if gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma}")
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """Mean squared error in float32; with ``weights`` (``[B]``) each sample's mean is weighted first.

    Returns:
        A float32 scalar: ``mean_b(w_b · mean(||pred_b - target_b||²))``, or the plain MSE.
    """
    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    return (per_sample * weights.float()).mean()


def diffusion_loss_from(
    noise_scheduler: DDPMScheduler,
    noised: Noised,
    prediction: torch.Tensor,
    snr_gamma: float | None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MSE of ``prediction`` to ``noised.target``, min-SNR-γ weighted when ``snr_gamma`` is set.

    ``sample_weights`` (float ``[B]``, the loader's ``loss_weights``) multiply each sample's loss as
    well; all ones (every subset at the default ``loss_weight``) leaves the loss as without them.
    """
    weights = None if snr_gamma is None else min_snr_weights(noise_scheduler, noised.timesteps, snr_gamma)
    if sample_weights is not None and not bool(torch.all(sample_weights == 1)):
        sample_weights = sample_weights.to(prediction.device, torch.float32)
        weights = sample_weights if weights is None else weights * sample_weights
    return weighted_mse(prediction, noised.target, weights)


def drop_captions(
    captions: Sequence[str], probability: float, rng: random.Random
) -> tuple[list[str], list[bool]]:
    """Replace each caption by ``""`` with ``probability`` (classifier-free guidance training, Ho &
    Salimans 2022, arXiv:2207.12598); one ``rng.random()`` draw per caption.

    Returns:
        (captions, dropped): the new captions, and which of them were dropped (a task may give those
        another unconditional embedding than that of ``""``, as SDXL's zeros).
    """
    dropped = [rng.random() < probability for _ in captions]
    return ["" if d else c for c, d in zip(captions, dropped, strict=True)], dropped


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` (``"no"``, ``"fp16"``, ``"bf16"``) on ``device``.

    Returns:
        ``None`` for full float32, else ``torch.float16`` or ``torch.bfloat16``.

    Raises:
        ValueError: ``"fp16"`` on a non-CUDA device (its gradient scaler is for CUDA), or an unknown value.
    """
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16":
        if device.type != "cuda":
            raise ValueError(f"mixed_precision 'fp16' needs a CUDA device, got {device}; use 'bf16' or 'no'")
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")


def make_optimizer(params: Sequence[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) over ``params``; bitsandbytes' 8-bit AdamW with ``use_8bit_adam``.

    Raises:
        ImportError: ``use_8bit_adam`` without bitsandbytes installed.
    """
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``get_scheduler``: linear warmup over ``lr_warmup_steps``, then constant, cosine or
    linear decay to 0 at ``max_steps`` (stepped once per optimizer step)."""
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_steps,
    )


def rng_state(noise: torch.Generator, captions: random.Random) -> dict[str, Any]:
    """Every random state a step reads: torch (CPU and CUDA), numpy, Python, the noise generator and the
    caption-dropout RNG, as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
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


class LossLog:
    """``OUTPUT/loss.csv`` (``step,loss``), written row by row; a resumed run keeps rows up to its start."""

    def __init__(self, path: Path, first_step: int) -> None:
        rows: list[list[str]] = []
        if first_step > 1 and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) < first_step]
        self._file = path.open("w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(["step", "loss"])
        self._writer.writerows(rows)
        self._file.flush()

    def write(self, step: int, loss: float) -> None:
        self._writer.writerow([step, f"{loss:.6g}"])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_loss_csv(path: Path) -> list[float]:
    """Losses of ``loss.csv`` in step order."""
    with path.open(newline="") as f:
        return [float(r[1]) for r in list(csv.reader(f))[1:] if r]


def epochs_of(loader: BatchLoader, first_epoch: int) -> Iterator[Batch]:
    """Batches of ``loader`` over epochs ``first_epoch, first_epoch + 1, …`` (``set_epoch`` each time).

    Raises:
        RuntimeError: An epoch yielded no batches.
    """
    epoch = first_epoch
    while True:
        loader.set_epoch(epoch)
        count = 0
        for batch in loader:
            count += 1
            yield batch
        if count == 0:
            raise RuntimeError(f"epoch {epoch} of the loader yielded no batches")
        epoch += 1


def save_sample_grid(images: torch.Tensor, captions: Sequence[str], path: Path) -> None:
    """Save images as a grid with one row per caption, the caption written left of its row.

    Args:
        images: float tensor ``[len(captions) * columns, 3, H, W]`` in ``[0, 1]``, row-major.
        captions: One caption per row.
        path: PNG file to write (matplotlib, Agg backend).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(captions)
    columns = images.shape[0] // rows
    pixels = images.permute(0, 2, 3, 1).numpy()
    label_width, cell = 2.5, 1.1  # inches
    fig = Figure(figsize=(label_width + cell * columns, cell * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for r, caption in enumerate(captions):
        for c in range(columns):
            ax = axes[r][c]
            ax.imshow(pixels[r * columns + c], interpolation="nearest")
            ax.set_axis_off()
        axes[r][0].text(
            -0.08, 0.5, caption, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8
        )
    left = label_width / (label_width + cell * columns)
    fig.subplots_adjust(left=left, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(path)


class _Checkpointer:
    """Writes and reads ``checkpoint-STEP`` folders for :func:`run`."""

    def __init__(self, config: TrainConfig, task: Task, loader: BatchLoader) -> None:
        self.config, self.task, self.loader = config, task, loader

    def save(self, step: int, objects: dict[str, Any], extra_files: Callable[[Path], None] | None) -> Path:
        from safetensors.torch import save_file

        final = self.config.output / f"checkpoint-{step}"
        tmp = self.config.output / f".checkpoint-{step}.tmp"
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
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2, default=str) + "\n")
        if extra_files is not None:
            extra_files(tmp)
        # Rename last, so that a run killed while saving never leaves a partial checkpoint-STEP.
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def load(self, folder: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        saved = json.loads((folder / CONFIG_FILE).read_text())
        here = json.loads(json.dumps(asdict(self.config), default=str))
        for name in RESUME_MUST_MATCH:
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
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name])
        load_state_dict = getattr(self.loader, "load_state_dict", None)
        if load_state_dict is None:
            raise TypeError(f"--resume needs a loader with load_state_dict(); {type(self.loader).__name__}")
        load_state_dict(json.loads((folder / LOADER_FILE).read_text()))
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


def run(
    task: Task,
    loader: BatchLoader,
    config: TrainConfig,
    device: torch.device,
    *,
    preview_prompts: Sequence[str] = (),
    checkpoint_files: Callable[[Path], None] | None = None,
) -> LoopResult:
    """Train ``task`` for ``config.max_steps`` optimizer steps on ``loader``'s batches.

    One step: take ``gradient_accumulation_steps`` batches; drop captions with ``caption_dropout``;
    for each, ``task.loss`` under autocast (``mixed_precision``) and backward of ``loss / accumulation``
    (scaled by ``GradScaler`` for fp16); unscale, clip the global L2 gradient norm to
    ``max_grad_norm``; optimizer step; LR scheduler step; EMA update (``ema_decay > 0``, diffusers
    ``EMAModel`` over the trainable parameters).

    Stability guard: when a micro-batch's loss is not finite, its backward is not run, the step's
    gradients are discarded and the weights, optimizer and EMA are left untouched; the same when the
    gradient norm is not finite (bf16/fp32; with fp16, ``GradScaler`` skips overflowing steps itself and
    they are counted as ``overflow_steps``). The step is counted, logged with its batches' paths, and
    still advances the step counter and the LR schedule. ``max_consecutive_skips`` skipped steps in a
    row stop the run.

    Checkpoints (every ``checkpoint_every`` steps, ``OUTPUT/checkpoint-STEP/``): the trainable
    parameters (``trainable.safetensors``), optimizer, LR scheduler, EMA, GradScaler, counters and
    every RNG state (``training_state.pt``), the loader's ``state_dict()`` (``loader.json``) and the
    config (``train_config.json``), plus ``checkpoint_files(folder)``. ``config.resume`` restores all of
    them, so the next step's loss equals an uninterrupted run's (bit-exact on CPU with the same torch
    thread count), and appends to ``OUTPUT/loss.csv`` (rows after the checkpoint's step are dropped).

    Previews (every ``preview_every`` steps and after the last): ``task.preview`` of
    ``preview_prompts`` with :data:`PREVIEW_SEEDS` seeds from ``seed``, EMA weights when EMA is on,
    under ``torch.random.fork_rng`` so that training randomness is unaffected; saved as
    ``OUTPUT/previews/step-NNNNNN.png``.

    After the last step, EMA weights (when on) are copied into the model before the caller saves it.

    Args:
        task: The model side.
        loader: Batches (``pixel_values``, ``captions``, ``paths``, …).
        config: The run's resolved settings (see :class:`fastdiff.train.TrainConfig`).
        device: Where the task's modules are.
        preview_prompts: Prompts of the previews (none: no previews).
        checkpoint_files: Writes extra files into each checkpoint folder (e.g. a LoRA adapter), from
            the EMA weights when EMA is on, as the final output.

    Returns:
        Losses and counters.

    Raises:
        RuntimeError: ``max_consecutive_skips`` steps in a row were skipped, or an epoch was empty.
        ValueError: ``config.resume`` is a checkpoint of an incompatible run.
        FileNotFoundError: ``config.resume`` holds no checkpoint.
    """
    from tqdm.auto import tqdm

    amp_dtype = autocast_dtype(config.mixed_precision, device)
    params_by_name = task.trainable()
    params = list(params_by_name.values())
    if not params:
        raise ValueError("the task has no trainable parameters")
    optimizer = make_optimizer(params, config)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    ema = None
    if config.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.ema_decay)
        ema.to(device)
    noise_gen = torch.Generator(device).manual_seed(config.seed)
    caption_rng = random.Random(config.seed)
    pin = device.type == "cuda"
    checkpointer = _Checkpointer(config, task, loader)

    step = skipped = consecutive = overflow = 0
    first_epoch = 0
    if config.resume is not None:
        folder = find_checkpoint(config.resume)
        state = checkpointer.load(folder)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
            ema.to(device)  # the loaded averages are on the CPU (map_location), the weights on `device`
        set_rng_state(state["rng"], noise_gen, caption_rng)
        step, skipped, consecutive, overflow = (
            int(state[k]) for k in ("step", "skipped", "consecutive", "overflow")
        )
        first_epoch = loader.epoch  # type: ignore[attr-defined]
        log.info("resumed from %s at step %d", folder, step)

    config.output.mkdir(parents=True, exist_ok=True)
    first_step = step + 1
    loss_log = LossLog(config.output / "loss.csv", first_step)
    batches = epochs_of(loader, first_epoch)
    accumulation = config.gradient_accumulation_steps
    losses: list[float] = []
    task.train_mode(True)
    start = time.perf_counter()
    data_seconds = 0.0

    def user_files(folder: Path) -> None:
        # The files a user loads from a checkpoint hold what the run's output would: the EMA weights.
        # (The raw weights that resuming needs are in the checkpoint's trainable file.)
        if checkpoint_files is None:
            return
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        try:
            checkpoint_files(folder)
        finally:
            if ema is not None:
                ema.restore(params)

    def preview(at: int) -> None:
        if not preview_prompts:
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if ema is not None:
                ema.store(params)
                ema.copy_to(params)
            task.train_mode(False)
            try:
                seeds = [config.seed + i for i in range(PREVIEW_SEEDS)]
                images = task.preview(preview_prompts, seeds=seeds, steps=config.preview_steps)
            finally:
                task.train_mode(True)
                if ema is not None:
                    ema.restore(params)
        folder = config.output / "previews"
        folder.mkdir(exist_ok=True)
        save_sample_grid(images, preview_prompts, folder / f"step-{at:06d}.png")

    try:
        with tqdm(total=config.max_steps, initial=step, desc="train", unit="step") as bar:
            while step < config.max_steps:
                step += 1
                waited = time.perf_counter()
                micro = [next(batches) for _ in range(accumulation)]
                data_seconds += time.perf_counter() - waited
                values: list[float] = []
                finite = True
                for batch in micro:
                    batch = dict(batch)
                    pixels = batch["pixel_values"]
                    batch["pixel_values"] = (pixels.pin_memory() if pin else pixels).to(
                        device, non_blocking=pin
                    )
                    batch["captions"], batch["captions_dropped"] = drop_captions(
                        batch["captions"], config.caption_dropout, caption_rng
                    )
                    loss = task.loss(batch, generator=noise_gen, amp_dtype=amp_dtype)
                    value = loss.item()
                    values.append(value)
                    if not math.isfinite(value):
                        finite = False
                        break
                    scaler.scale(loss / accumulation).backward()
                step_loss = float(np.mean(values)) if finite else values[-1]
                reason = "" if finite else "loss"
                if finite:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    grads_finite = bool(torch.isfinite(norm))
                    if scaler.is_enabled():
                        scale = scaler.get_scale()
                        scaler.step(optimizer)  # skips the update itself when the gradients overflowed
                        scaler.update()
                        if not grads_finite or scaler.get_scale() < scale:
                            overflow += 1
                        elif ema is not None:
                            ema.step(params)
                    elif grads_finite:
                        optimizer.step()
                        if ema is not None:
                            ema.step(params)
                    else:
                        reason = "gradient"
                optimizer.zero_grad(set_to_none=True)
                lr_scheduler.step()
                if reason:
                    skipped += 1
                    consecutive += 1
                    paths = [p for b in micro for p in b.get("paths", [])]
                    log.warning("step %d skipped: non-finite %s (batch: %s)", step, reason, ", ".join(paths))
                    if consecutive >= config.max_consecutive_skips:
                        raise RuntimeError(
                            f"{consecutive} consecutive steps (up to step {step}) had a non-finite {reason}; "
                            f"stopping. Last batch: {', '.join(paths) or '?'}. Check those images, lower "
                            "learning_rate, or use mixed_precision 'no' or 'bf16'."
                        )
                else:
                    consecutive = 0
                losses.append(step_loss)
                loss_log.write(step, step_loss)
                bar.set_postfix(loss=f"{step_loss:.4f}", skipped=skipped, refresh=False)
                bar.update()
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    state = {
                        "step": step,
                        "skipped": skipped,
                        "consecutive": consecutive,
                        "overflow": overflow,
                        "optimizer": optimizer.state_dict(),
                        "lr_scheduler": lr_scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "rng": rng_state(noise_gen, caption_rng),
                    }
                    checkpointer.save(step, state, user_files)
                if config.preview_every and step % config.preview_every == 0:
                    preview(step)
        if config.preview_every and step % config.preview_every != 0:
            preview(step)
    finally:
        loss_log.close()
        batches.close()
    seconds = time.perf_counter() - start
    if ema is not None:
        ema.copy_to(params)
    return LoopResult(losses, first_step, skipped, overflow, seconds, data_seconds)
