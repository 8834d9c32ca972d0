"""The CUDA checks of issues 3 and 6, in one script for a session that is lent a GPU (a few minutes).

usage: python benches/gpu_check.py [PHOTOS] [--json benches/results/gpu-check.json] [--steps 40]
       python benches/gpu_check.py --smoke      # the same code paths on CPU with tiny sizes (no numbers)

1. **H2D bandwidth** of a loader batch (512, batch 8, bfloat16): ``pin_memory=True`` (written straight
   into pinned memory by the workers) against pageable memory, timed with CUDA events, GB/s.
2. **Data stall** (issue 3): loader → pinned batch → ``cuda(non_blocking=True)`` → one training step of
   an SD-1.5-sized ``UNet2DConditionModel`` (random init, its published config) at 512 in bf16 autocast;
   the fraction of wall time the loop spends blocked in ``next(loader)`` (target < 2%). The 64×64×4
   latents are an average-pooled stand-in for the VAE (the data path is the loader's, the UNet step is
   real); text states are random ``[B, 77, 768]``.
3. **Fine-tuning loop** (issue 6): ``fastdiff.training.run.train`` on tiny SD-1.5- and SDXL-shaped pipelines
   (``tests/tiny_sd.py``) with bf16 and fp16 AMP, fed by the loader from the photos: steps/s, peak GPU
   memory, and the data-wait share of the loop.

Writes every number to ``--json`` and prints a summary; record it in benches/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FASTDIFF_CACHE", Path.home() / ".cache" / "fastdiff" / "corpus"))

#: diffusers' SD-1.5 UNet configuration (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
)


def h2d_bandwidth(root: Path, device: torch.device, batches: int, smoke: bool) -> dict[str, float]:
    """GB/s of ``pixel_values.to(device, non_blocking=True)`` for pinned and for pageable batches."""
    import fastdiff

    out = {}
    for pinned in (True, False):
        loader = fastdiff.DataLoader(
            root, resolution=64 if smoke else 512, batch_size=8, dtype=torch.bfloat16, pin_memory=pinned
        )
        seconds, nbytes = 0.0, 0
        for i, batch in zip(range(batches), loader, strict=False):
            px = batch["pixel_values"]
            if device.type != "cuda":
                px.to(device)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            px.to(device, non_blocking=True)
            end.record()
            end.synchronize()
            if i > 0:  # the first copy pays for lazy CUDA set-up
                seconds += start.elapsed_time(end) / 1000
                nbytes += px.nbytes
        out["pinned_gb_s" if pinned else "pageable_gb_s"] = nbytes / seconds / 1e9 if seconds else 0.0
    return out


def data_stall(root: Path, device: torch.device, steps: int, smoke: bool) -> dict[str, float]:
    """Blocked-in-``next`` share of a bf16 SD-1.5-sized UNet training loop fed by the loader."""
    import fastdiff
    from diffusers import UNet2DConditionModel

    config = dict(SD15_UNET)
    if smoke:
        config.update(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, sample_size=8)
    unet = UNet2DConditionModel(**config).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    loader = fastdiff.DataLoader(
        root,
        resolution=64 if smoke else 512,
        batch_size=8 if not smoke else 2,
        dtype=torch.bfloat16,
        pin_memory=device.type == "cuda",
        crop="random",
        flip_prob=0.5,
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    it = iter(loader)
    waited, done, images, t0 = 0.0, 0, 0, 0.0
    for step in range(steps + 2):
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        if step >= 2:  # two warm-up steps (cuDNN autotune, allocator)
            waited += time.perf_counter() - t
        px = batch["pixel_values"].to(device, non_blocking=True)
        latents = F.avg_pool2d(px.float(), 8)
        latents = torch.cat([latents, latents[:, :1]], dim=1) * 0.18215
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=device)
        text = torch.randn(latents.shape[0], 77, config["cross_attention_dim"], device=device)
        with amp:
            pred = unet(latents + noise, timesteps, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        done += step >= 2
        images += latents.shape[0] if step >= 2 else 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {
        "steps": done,
        "steps_per_s": done / wall,
        "images_per_s": images / wall,
        "data_stall_fraction": waited / wall,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0,
    }


def finetune_loops(root: Path, steps: int, smoke: bool) -> list[dict[str, object]]:
    """``fastdiff.training.run.train`` on tiny SD-1.5- and SDXL-shaped pipelines, bf16 and fp16 (CUDA)."""
    sys.path.insert(0, str(REPO / "tests"))
    from fastdiff.training.config import TrainConfig
    from fastdiff.training.run import train
    from tiny_sd import build_sd15, build_sdxl

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"sd15": build_sd15(Path(tmp, "sd15")), "sdxl": build_sdxl(Path(tmp, "sdxl"))}
        precisions = ["bf16", "fp16"] if torch.cuda.is_available() else ["no"]
        for name, model in models.items():
            for mp in precisions:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                config = TrainConfig(
                    model=model,
                    data=root,
                    output=Path(tmp, f"out-{name}-{mp}"),
                    resolution=64,
                    batch_size=4,
                    max_steps=steps,
                    lora_rank=4,
                    mixed_precision=mp,
                    checkpoint_every=0,
                    preview_every=0,
                )
                result = train(config)
                rows.append(
                    {
                        "model": name,
                        "mixed_precision": mp,
                        "steps_per_s": len(result.losses) / result.seconds,
                        "data_wait_fraction": result.data_seconds / result.seconds,
                        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20
                        if torch.cuda.is_available()
                        else 0.0,
                        "final_loss": result.losses[-1],
                    }
                )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, nargs="?", default=CACHE / "photos")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: checks the code paths only")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device: run with --smoke to check the code paths on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = 3 if args.smoke else args.steps
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "h2d": h2d_bandwidth(args.root, device, 4 if args.smoke else 30, args.smoke),
        "sd15_unet_bf16_512": data_stall(args.root, device, steps, args.smoke),
        "finetune": finetune_loops(args.root, steps, args.smoke),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
