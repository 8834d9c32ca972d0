"""One rank of the torchrun job of ``test_distributed.py``: a tiny DDP model trained on fastdiff batches.

Usage: ``torchrun --nproc_per_node=N dist_worker.py FOLDER OUT.json``. Rank and world size come from
``torch.distributed`` (the loader's defaults); rank 0 writes every rank's record to ``OUT.json``.
"""

from __future__ import annotations

import json
import os
import sys

import fastdiff
import torch
import torch.distributed as dist


def main() -> None:
    folder, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(3, 4, 3, padding=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    record: dict = {"rank": rank, "runs": {}}
    for remainder, epochs in (("pad", 2), ("drop", 1)):
        loader = fastdiff.DataLoader(
            folder, resolution=128, bucket_step=32, batch_size=2, seed=1, num_threads=1, remainder=remainder
        )
        assert (loader.rank, loader.world_size) == (rank, world)
        steps = []
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                loss = model(batch["pixel_values"]).pow(2).mean()
                opt.zero_grad()
                loss.backward()  # DDP all-reduces here: every rank must reach it the same number of times
                opt.step()
                steps.append(
                    {"epoch": epoch, "shape": list(batch["pixel_values"].shape), "paths": batch["paths"]}
                )
        record["runs"][remainder] = {"len": len(loader), "steps": steps, "report": loader.report}
    record["weight_sum"] = float(model.module.weight.detach().sum())
    gathered: list = [None] * world
    dist.all_gather_object(gathered, record)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    # No rank may tear its connections down while another still uses them (gloo aborts then).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is checked and written: skip the interpreter's teardown, where gloo's threads can still
    # be destroyed joinable ("terminate called without an active exception", SIGABRT; seen once in ~10
    # runs on a loaded machine; upstream: pytorch/pytorch#179291).
    sys.stdout.flush()
    os._exit(0)
