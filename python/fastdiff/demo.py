"""``fastdiff demo``: train the tiny text-to-image model on synthetic coloured shapes, on CPU, in minutes.

The demo draws a captioned data set ("a red circle on a blue background", …: every shape in every
colour on every other background colour, in three aspect ratios, as JPEG and PNG) into ``OUT/data``,
trains :func:`fastdiff.train.train` on it through :class:`fastdiff.DataLoader` (aspect buckets at
resolution 64), then samples a few captions with classifier-free guidance. It writes ``OUT/loss.csv``,
``OUT/loss.png``, the weights, ``OUT/samples.png`` (one row per caption, labelled) and
``OUT/samples.txt`` (the captions, row by row), and checks that the mean loss of the last 10% of steps
is below half the mean of the first 10%.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff.train import MIXED_PRECISION, TrainConfig, TrainResult, sample, train

#: Fill colours (RGB, 0-255) of shapes and backgrounds, by caption word.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
}
SHAPES = ("circle", "square", "triangle")
#: Image sizes (width, height) in pixels, cycled per caption: square, landscape 3:2, portrait 2:3.
SIZES = ((96, 96), (144, 96), (96, 144))
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
#: Training settings of the demo: resolution 64, buckets of 16 px (64x64, 80x48, 48x80 here).
RESOLUTION = 64
BUCKET_STEP = 16
LEARNING_RATE = 2e-3
UNET_CHANNELS = (16, 32, 64)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``fastdiff demo``; each field is the flag of the same name.

    Attributes:
        output: Output folder; the data set goes to ``output/data``.
        steps: Training steps.
        batch_size: Images per batch.
        images_per_caption: Images drawn per caption (sizes cycle through :data:`SIZES`).
        samples_per_caption: Images sampled per caption in ``samples.png``.
        sample_steps: DDIM steps per sample.
        guidance_scale: Classifier-free guidance scale of the samples.
        mixed_precision: ``"no"``, ``"fp16"`` (CUDA) or ``"bf16"``.
        seed: Seed of the drawing, the training and the samples.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, …
    """

    output: Path = Path("fastdiff-demo")
    steps: int = 400
    batch_size: int = 16
    images_per_caption: int = 3
    samples_per_caption: int = 4
    sample_steps: int = 30
    guidance_scale: float = 3.0
    mixed_precision: str = "no"
    seed: int = 0
    device: str = "auto"


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

    The shape spans 45-70% of the short side and stays inside the central square of the image, so
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
    side = rng.uniform(0.45, 0.7) * short
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
    fig = Figure(figsize=(3.2 + 1.1 * columns, 1.1 * rows), dpi=100)
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
    fig.subplots_adjust(left=3.2 / (3.2 + 1.1 * columns), right=0.99, top=0.99, bottom=0.01, wspace=0.05)
    fig.savefig(path)


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
            steps=config.steps,
            learning_rate=LEARNING_RATE,
            unet_channels=UNET_CHANNELS,
            mixed_precision=config.mixed_precision,
            seed=config.seed,
            device=config.device,
        )
    )
    first, last = loss_means(result.losses)
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
    parser.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps per sample")
    parser.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=d.mixed_precision)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device, help="'auto' (CUDA if available), 'cpu', 'cuda', ...")


def run_demo(args: argparse.Namespace) -> int:
    """Body of ``fastdiff demo``: run it and print the loss check.

    Returns:
        0 when the last-10% mean loss is below half the first-10% mean, else 1.
    """
    result = demo(
        DemoConfig(
            output=args.output,
            steps=args.steps,
            batch_size=args.batch_size,
            images_per_caption=args.images_per_caption,
            samples_per_caption=args.samples_per_caption,
            sample_steps=args.sample_steps,
            guidance_scale=args.guidance_scale,
            mixed_precision=args.mixed_precision,
            seed=args.seed,
            device=args.device,
        )
    )
    verdict = "OK" if result.loss_halved else "FAILED: not below half"
    print(
        f"loss, mean of the first 10% of steps: {result.first_loss:.4f}; "
        f"of the last 10%: {result.last_loss:.4f} ({result.last_loss / result.first_loss:.1%}) {verdict}"
    )
    print(f"samples: {result.samples_png} (captions: {result.samples_txt}), loss: {result.train.loss_png}")
    print(f"demo wall time: {result.seconds:.1f} s")
    return 0 if result.loss_halved else 1
