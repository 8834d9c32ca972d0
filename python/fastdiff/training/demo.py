"""``fastdiff demo``: train the tiny text-to-image model on synthetic coloured shapes, on CPU, in minutes.

The demo draws a captioned data set ("a red circle on a blue background", …: every shape in every
colour on every other background colour, in three aspect ratios, as JPEG and PNG) into ``OUT/data``,
trains :func:`fastdiff.training.run.train` on it through :class:`fastdiff.DataLoader` (three aspect buckets),
then samples a few captions. It holds :data:`VALIDATION_SPLIT` of the images out (the loader's
seeded ``validation_split``) and computes their validation loss every :data:`VALIDATE_EVERY` steps
(``OUT/val_loss.csv``, drawn in ``OUT/loss.png``). It writes ``OUT/loss.csv``, ``OUT/loss.png``, the weights,
``OUT/samples.png`` (one row per caption, labelled) and ``OUT/samples.txt`` (the captions, row by
row), and checks that the mean loss of the last 10% of steps is below half the mean of the first 10%.

Settings, as measured on the shared 2-core CPU (where the default run took 4.4 minutes):

- Resolution 32 with 8-pixel bucket steps (32x32, 40x24, 24x40). At 64 a step cost 1.8x more even
  with half the UNet channels, and 450 steps (5.3 minutes) gave noisier samples than 700 steps at 32.
- v-prediction, not ``train``'s default epsilon. Here the caption only matters at nearly pure noise
  (any less noisy image shows its own colours), where epsilon's loss barely depends on it: after 600
  epsilon steps the text encoder had collapsed (the predictions for two different captions differed
  by ~1e-4) and samples had random colours. With v-prediction they differed by ~0.5 after 300 steps,
  and the samples take the captions' colours.
- One torch thread and one loader thread: on a 2-core machine shared with other work, two OpenMP
  threads made steps 2-25x slower than one (see :attr:`fastdiff.training.config.TrainConfig.torch_threads`).
- Ancestral DDPM sampling, 100 steps, without guidance: cleaner than DDIM at this training length,
  and guidance of 3 erased most shapes.

Pillow (the ``train`` extra) is imported where used, so that ``fastdiff.cli`` starts without it and
reports the missing extra itself.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fastdiff.training.config import MIXED_PRECISION, SAMPLERS, TrainConfig
from fastdiff.training.outputs import save_sample_grid
from fastdiff.training.run import TrainResult, train
from fastdiff.training.tiny import sample

#: Fill colours (RGB, 0-255) of shapes and backgrounds, by caption word.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
}
SHAPES = ("circle", "square", "triangle")
#: Image sizes (width, height) in pixels, cycled per caption: square, landscape 3:2, portrait 2:3.
SIZES = ((64, 64), (96, 64), (64, 96))
#: The captions drawn in ``samples.png``, one row each.
SAMPLE_CAPTIONS = (
    "a red circle on a blue background",
    "a yellow square on a green background",
    "a blue triangle on a yellow background",
    "a green circle on a red background",
    "a red square on a yellow background",
    "a yellow circle on a blue background",
)
#: File in ``OUT/data`` marking the folder as the demo's own, so a rerun may delete and redraw it.
MARKER = ".fastdiff-demo"
#: Training resolution and bucket step of the demo, in pixels (buckets 32x32, 40x24 and 24x40 here).
RESOLUTION = 32
BUCKET_STEP = 8
#: The demo's prediction target (see the module docstring).
PREDICTION_TYPE = "v_prediction"
#: Share of the demo's images held out for the validation loss, and how often it is computed (steps):
#: a few dozen single-image forward passes in all, next to 700 training steps of 8.
VALIDATION_SPLIT = 0.1
VALIDATE_EVERY = 100


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``fastdiff demo``; each field is the flag of the same name.

    Attributes:
        output: Output folder; the data set goes to ``output/data``.
        steps: Training steps.
        batch_size: Images per batch.
        images_per_caption: Images drawn per caption (sizes cycle through :data:`SIZES`).
        samples_per_caption: Images sampled per caption in ``samples.png``.
        sampler: ``"ddpm"`` or ``"ddim"`` (see :func:`fastdiff.training.tiny.sample`).
        sample_steps: Denoising steps per sample.
        guidance_scale: Classifier-free guidance scale of the samples (1: none).
        mixed_precision: ``"no"``, ``"fp16"`` (CUDA) or ``"bf16"``.
        seed: Seed of the drawing, the training and the samples.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, …
        threads: torch threads and loader threads (0: torch's and the loader's defaults, all cores).
    """

    output: Path = Path("fastdiff-demo")
    steps: int = 700
    batch_size: int = 16
    images_per_caption: int = 3
    samples_per_caption: int = 4
    sampler: str = "ddpm"
    sample_steps: int = 100
    guidance_scale: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    device: str = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        """Check the fields that are only used after training, so that a typo fails at once.

        Raises:
            ValueError: A field is out of range; the message names it.
        """
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name in ("images_per_caption", "samples_per_caption", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


@dataclass
class DemoResult:
    """What :func:`demo` produced.

    Attributes:
        train: The training run's result.
        first_loss: Mean finite loss over the first 10% of steps.
        last_loss: Mean finite loss over the last 10% of steps.
        samples_png: The labelled sample grid.
        samples_txt: The captions of the grid's rows, one per line.
        seconds: Wall time of the whole demo in seconds.
    """

    train: TrainResult
    first_loss: float
    last_loss: float
    samples_png: Path
    samples_txt: Path
    seconds: float

    @property
    def loss_halved(self) -> bool:
        """The acceptance check: the last-10% mean loss is below half the first-10% mean."""
        return self.last_loss < self.first_loss / 2


def all_captions() -> list[str]:
    """Every caption of the data set: each shape in each colour on each other background colour."""
    return [
        f"a {fg} {shape} on a {bg} background"
        for shape in SHAPES
        for fg in COLOURS
        for bg in COLOURS
        if fg != bg
    ]


def draw_shape(size: tuple[int, int], shape: str, fg: str, bg: str, rng: random.Random) -> np.ndarray:
    """Draw one filled shape of random size and position on a plain background.

    The shape spans 55-80% of the short side and stays inside the central square of the image, so
    cropping to any demo bucket keeps it whole.

    Args:
        size: ``(width, height)`` in pixels.
        shape: One of :data:`SHAPES`.
        fg: Shape colour name (a key of :data:`COLOURS`).
        bg: Background colour name.
        rng: Source of the size and position.

    Returns:
        uint8 array ``[height, width, 3]``.
    """
    from PIL import Image, ImageDraw

    width, height = size
    short = min(width, height)
    side = rng.uniform(0.55, 0.8) * short
    slack = (short - side) / 2
    left = (width - short) / 2 + rng.uniform(0.2, 0.8) * 2 * slack
    top = (height - short) / 2 + rng.uniform(0.2, 0.8) * 2 * slack
    box = (left, top, left + side, top + side)
    image = Image.new("RGB", size, COLOURS[bg])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[fg])
    elif shape == "triangle":
        draw.polygon(
            [(left + side / 2, top), (left + side, top + side), (left, top + side)], fill=COLOURS[fg]
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(image)


def make_shapes_dataset(root: Path, *, images_per_caption: int, seed: int) -> list[str]:
    """Write the synthetic data set: ``images_per_caption`` images per caption of :func:`all_captions`.

    Image ``i`` of a caption has size ``SIZES[i % 3]``; images alternate JPEG (quality 95) and PNG.
    Each image ``NNNN.{jpg,png}`` has its caption in ``NNNN.txt``.

    Args:
        root: Existing, empty folder.
        images_per_caption: Images per caption (≥ 1).
        seed: Seed of the shapes' sizes and positions.

    Returns:
        The captions, in file order (one per image).
    """
    from PIL import Image

    rng = random.Random(seed)
    written: list[str] = []
    for caption in all_captions():
        _, fg, shape, _, _, bg, _ = caption.split()
        for i in range(images_per_caption):
            n = len(written)
            pixels = draw_shape(SIZES[i % len(SIZES)], shape, fg, bg, rng)
            if n % 2:
                Image.fromarray(pixels).save(root / f"{n:04d}.png")
            else:
                Image.fromarray(pixels).save(root / f"{n:04d}.jpg", quality=95)
            (root / f"{n:04d}.txt").write_text(caption + "\n", encoding="utf-8")
            written.append(caption)
    return written


def prepare_data_dir(path: Path) -> Path:
    """Create ``path`` empty for the data set, deleting a previous demo's data set there.

    Args:
        path: The data folder (``OUT/data``).

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists, is not empty and was not made by the demo.
    """
    if path.exists():
        if not (path / MARKER).exists() and any(path.iterdir()):
            raise FileExistsError(
                f"{path} exists and is not a fastdiff demo data set; choose another --output"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("synthetic data set written by `fastdiff demo`; deleted by the next run\n")
    return path


def loss_means(losses: Sequence[float], fraction: float = 0.1) -> tuple[float, float]:
    """Mean finite loss over the first and over the last ``fraction`` of the steps.

    Args:
        losses: Loss per step.
        fraction: Share of the steps in each window (at least one step).

    Returns:
        ``(first_mean, last_mean)``.

    Raises:
        ValueError: A window holds no finite loss.
    """
    k = max(1, round(len(losses) * fraction))
    means = []
    for window in (losses[:k], losses[-k:]):
        finite = [v for v in window if math.isfinite(v)]
        if not finite:
            raise ValueError(f"no finite loss in a {k}-step window: {list(window)}")
        means.append(sum(finite) / len(finite))
    return means[0], means[1]


def demo(config: DemoConfig) -> DemoResult:
    """Draw the data set, train on it, sample :data:`SAMPLE_CAPTIONS` and measure the loss drop.

    Args:
        config: The demo's settings.

    Returns:
        The training result, the loss means, the sample files and the total wall time.

    Raises:
        FileExistsError: ``config.output / "data"`` holds files that the demo did not write.
    """
    start = time.perf_counter()
    data = prepare_data_dir(config.output / "data")
    make_shapes_dataset(data, images_per_caption=config.images_per_caption, seed=config.seed)
    result = train(
        TrainConfig(
            data=data,
            output=config.output,
            resolution=RESOLUTION,
            bucket_step=BUCKET_STEP,
            batch_size=config.batch_size,
            max_steps=config.steps,
            checkpoint_every=0,
            validation_split=VALIDATION_SPLIT,
            validate_every=min(VALIDATE_EVERY, config.steps),
            prediction_type=PREDICTION_TYPE,
            mixed_precision=config.mixed_precision,
            seed=config.seed,
            num_threads=config.threads or None,
            torch_threads=config.threads or None,
            device=config.device,
        )
    )
    first, last = loss_means(result.losses)
    assert result.text_encoder is not None  # a from-scratch run has its own
    prompts = [c for c in SAMPLE_CAPTIONS for _ in range(config.samples_per_caption)]
    images = sample(
        result.unet,
        result.text_encoder,
        result.tokenizer,
        prompts,
        noise_scheduler=result.noise_scheduler,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=config.sample_steps,
        guidance_scale=config.guidance_scale,
        sampler=config.sampler,
        seed=config.seed,
    )
    samples_png = config.output / "samples.png"
    samples_txt = config.output / "samples.txt"
    save_sample_grid(images, SAMPLE_CAPTIONS, samples_png)
    samples_txt.write_text("".join(f"{c}\n" for c in SAMPLE_CAPTIONS), encoding="utf-8")
    return DemoResult(result, first, last, samples_png, samples_txt, time.perf_counter() - start)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastdiff demo`` flags, one per :class:`DemoConfig` field, to ``parser``.

    Args:
        parser: The subcommand's parser.
    """
    d = DemoConfig
    parser.add_argument("--output", type=Path, default=d.output, help=f"output folder (default {d.output})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--images-per-caption", type=int, default=d.images_per_caption)
    parser.add_argument("--samples-per-caption", type=int, default=d.samples_per_caption)
    parser.add_argument("--sampler", choices=SAMPLERS, default=d.sampler)
    parser.add_argument("--sample-steps", type=int, default=d.sample_steps, help="denoising steps per sample")
    parser.add_argument("--guidance-scale", type=float, default=d.guidance_scale, help="1: no guidance")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=d.mixed_precision)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device, help="'auto' (CUDA if available), 'cpu', 'cuda', ...")
    parser.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help=f"torch and loader threads, 0: all cores (default {d.threads})",
    )


def run_demo(args: argparse.Namespace) -> int:
    """Body of ``fastdiff demo``: run it and print the loss check.

    Returns:
        0 when the last-10% mean loss is below half the first-10% mean, else 1.
    """
    result = demo(DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)}))
    verdict = "OK" if result.loss_halved else "FAILED: not below half"
    print(
        f"loss, mean of the first 10% of steps: {result.first_loss:.4f}; "
        f"of the last 10%: {result.last_loss:.4f} ({result.last_loss / result.first_loss:.1%}) {verdict}"
    )
    curve = ", ".join(f"{step}: {loss:.4f}" for step, loss in result.train.validation)
    print(f"validation loss (held-out images, fixed noise) by step: {curve}")
    print(f"samples: {result.samples_png} (captions: {result.samples_txt}), loss: {result.train.loss_png}")
    print(f"demo wall time: {result.seconds:.1f} s")
    return 0 if result.loss_halved else 1
