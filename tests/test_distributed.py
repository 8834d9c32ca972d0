"""``torchrun --nproc_per_node=2`` (gloo, CPU) with a tiny DDP model on real images: the ranks run the same
number of steps with the same batch shapes, on disjoint samples whose union is the dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_resume import smallest

WORLD = 2


def test_torchrun_two_ranks_step_together_on_disjoint_samples(wallpapers: Path, tmp_path: Path) -> None:
    folder = smallest(wallpapers, tmp_path / "data", 9)
    files = sorted(str(p) for p in folder.iterdir() if p.suffix != ".txt")
    out = tmp_path / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    worker = Path(__file__).with_name("dist_worker.py")
    proc = subprocess.run(
        [*cmd, str(worker), str(folder), str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == list(range(WORLD))
    # DDP kept the replicas identical, which it only does if every rank stepped the same number of times.
    assert ranks[0]["weight_sum"] == ranks[1]["weight_sum"]

    for remainder, epochs in (("pad", 2), ("drop", 1)):
        runs = [r["runs"][remainder] for r in ranks]
        n = runs[0]["len"]
        assert n > 0 and all(r["len"] == n and len(r["steps"]) == n * epochs for r in runs)
        for a, b in zip(runs[0]["steps"], runs[1]["steps"], strict=True):
            assert a["epoch"] == b["epoch"] and a["shape"] == b["shape"]  # same bucket and size each step
        for epoch in range(epochs):
            per_rank = [[p for s in r["steps"] if s["epoch"] == epoch for p in s["paths"]] for r in runs]
            union = set(per_rank[0]) | set(per_rank[1])
            if remainder == "pad":
                # Everything is seen; only the padding of a bucket's short last batch repeats samples.
                assert sorted(union) == files
                pads = sum((-(k % (2 * WORLD))) % WORLD for _, k in runs[0]["report"]["images_per_bucket"])
                assert len(per_rank[0]) + len(per_rank[1]) == len(files) + pads
            else:
                assert not set(per_rank[0]) & set(per_rank[1])  # disjoint
                assert all(len(set(p)) == len(p) for p in per_rank)
                dropped = sum(k % (2 * WORLD) % WORLD for _, k in runs[0]["report"]["images_per_bucket"])
                assert len(union) == len(files) - dropped
