"""A miniature of diffusers' ``train_text_to_image.py`` on fastdiff, run by tests/test_accelerate_launch.py
under ``accelerate launch``.

It relies on exactly what the diffusers scripts rely on from their data loader: batches on
``accelerator.device`` (``pixel_values`` into the VAE, ``input_ids`` into the text encoder), resuming with
``accelerator.load_state`` (the loader is registered with ``register_for_checkpointing``, which stands
in for the scripts' ``skip_first_batches``), ``save_state`` every ``--save-every`` steps, several
processes (each rank takes its slice of each global batch; as in the scripts, only the main process
saves). Each process appends one JSON line per step
to ``<output>/steps-<rank>.jsonl``: global step, epoch, its sample paths, the devices, the loss.

Usage: accelerate launch --cpu --num_processes 1 tests/accelerate_script.py PIPELINE DATA OUTPUT
    --max-steps S [--save-every K] [--resume CHECKPOINT]
(two CPU processes: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...``;
``--cpu --num_processes 2`` starts one process in accelerate 1.16.)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import fastdiff
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", type=Path, default=None)
    args = parser.parse_args()

    accelerator = Accelerator()
    tokenizer = CLIPTokenizer.from_pretrained(args.pipeline / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.pipeline / "text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(args.pipeline / "vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(args.pipeline / "unet")
    scheduler = DDPMScheduler.from_pretrained(args.pipeline / "scheduler")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)

    # The swap: this replaces the scripts' dataset, transforms, collate_fn and torch DataLoader.
    loader = fastdiff.DataLoader(
        args.data,
        resolution=32,
        bucket_step=16,
        batch_size=1,
        num_threads=1,
        device=accelerator.device,
        tokenizer=tokenizer,
    )
    # accelerate passes a fastdiff loader through prepare unchanged (it places its batches itself).
    unet, optimizer, prepared = accelerator.prepare(unet, optimizer, loader)
    assert prepared is loader
    accelerator.register_for_checkpointing(loader)
    text_encoder.to(accelerator.device)
    vae.to(accelerator.device)

    global_step = 0
    if args.resume is not None:
        accelerator.load_state(str(args.resume))  # restores the loader's epoch and position too
        global_step = int(args.resume.name.split("-")[1])
    first_epoch = global_step // len(loader)

    log = (args.output / f"steps-{accelerator.process_index}.jsonl").open("a", encoding="utf-8")
    epoch = first_epoch
    while global_step < args.max_steps:
        loader.set_epoch(epoch)  # keeps the restored position when it is the restored epoch
        for batch in loader:
            with accelerator.accumulate(unet):
                # Seeded per step and rank so that a resumed run draws what the uninterrupted one did.
                generator = torch.Generator().manual_seed(1000 * global_step + accelerator.process_index)
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator=generator)
                latents = latents * vae.config.scaling_factor
                noise = torch.randn(latents.shape, generator=generator).to(latents.device)
                timesteps = torch.randint(
                    0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator
                )
                noisy = scheduler.add_noise(latents, noise, timesteps.to(latents.device))
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                pred = unet(noisy, timesteps.to(latents.device), encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            global_step += 1
            record = {
                "step": global_step,
                "epoch": epoch,
                "paths": [os.path.basename(p) for p in batch["paths"]],
                "devices": sorted({batch["pixel_values"].device.type, batch["input_ids"].device.type}),
                "expected_device": accelerator.device.type,
                "ranks": [
                    loader.rank,
                    loader.world_size,
                    accelerator.process_index,
                    accelerator.num_processes,
                ],
                "input_ids_shape": list(batch["input_ids"].shape),
                "loss": loss.item(),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            if args.save_every and global_step % args.save_every == 0 and accelerator.is_main_process:
                accelerator.save_state(str(args.output / f"checkpoint-{global_step}"))
            if global_step >= args.max_steps:
                break
        epoch += 1
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
