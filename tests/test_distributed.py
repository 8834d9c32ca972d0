"""``torchrun --nproc_per_node=2`` (gloo, CPU) with a tiny DDP model on real images: the ranks run the same
number of steps with the same batch shapes, on disjoint samples whose union is the dataset."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import fastdiff
import pytest
import torch
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


def _consume(
    loaders: list[fastdiff.DataLoader], batches: int | None, steps: list[int] | None = None
) -> list[tuple[str, tuple[int, int]]]:
    """(path, bucket) of every sample the ranks' ``loaders`` yield in their next ``batches`` steps (all);
    each rank's number of steps is appended to ``steps``."""
    seen = []
    for loader in loaders:
        i = 0
        for i, batch in enumerate(loader, 1):
            seen += [(p, tuple(batch["target_sizes"][0])) for p in batch["paths"]]
            if i == batches:
                break
        if steps is not None:
            steps.append(i)
    return seen


def _loaders(folder: Path, world_size: int, batch_size: int, state: dict | None) -> list[fastdiff.DataLoader]:
    opts = dict(resolution=128, bucket_step=32, seed=4, num_threads=1)
    loaders = [
        fastdiff.DataLoader(folder, batch_size=batch_size, rank=r, world_size=world_size, **opts)
        for r in range(world_size)
    ]
    for loader in loaders:
        loader.set_epoch(1)
        if state is not None:
            loader.load_state_dict(state)
    return loaders


def _pads(remaining: Counter, world_size: int, batch_size: int) -> int:
    """Samples ``remainder="pad"`` repeats in the rest of an epoch (``remaining``: samples per bucket)."""
    g = batch_size * world_size
    return sum(-(n % g) % world_size for n in remaining.values())


def test_elastic_resume_consumes_each_remaining_sample_once(wallpapers: Path, tmp_path: Path) -> None:
    # 4 ranks x 1 consumed 2 global batches of epoch 1; resumed on 2 or 3 ranks, or with batch_size 2.
    folder = smallest(wallpapers, tmp_path / "data", 14)
    files = sorted(str(p) for p in folder.iterdir() if p.suffix != ".txt")
    before = _loaders(folder, 4, 1, None)
    consumed = _consume(before, 2)
    state = before[0].state_dict()
    assert state["segments"] == [{"batch_size": 1, "world_size": 4, "batches": 2}]
    assert state["epoch"] == 1 and state["world_size"] == 4
    buckets = dict(_consume(_loaders(folder, 1, 1, None), None))  # every file's bucket
    assert sorted(buckets) == files and len(set(buckets.values())) > 1
    left = Counter(buckets[p] for p in files if p not in {c[0] for c in consumed})
    for world_size, batch_size in ((2, 1), (3, 1), (4, 2), (1, 5)):
        after = _loaders(folder, world_size, batch_size, state)
        steps: list[int] = []
        expected = [loader.batches_left for loader in after]
        rest = _consume(after, None, steps)
        assert steps == expected == [expected[0]] * world_size  # the ranks step together
        paths = [p for p, _ in rest]
        assert not set(paths) & {c[0] for c in consumed}, "a consumed sample came again"
        assert sorted(set(paths) | {c[0] for c in consumed}) == files, "a sample was lost"
        assert len(paths) - len(set(paths)) == _pads(left, world_size, batch_size)
        assert all(buckets[p] == b for p, b in rest)
    # A second elastic resume (3 ranks, one step, then 2 ranks x 2) continues the same cursor.
    middle = _loaders(folder, 3, 1, state)
    second = _consume(middle, 1)
    state2 = middle[0].state_dict()
    assert state2["segments"] == [
        {"batch_size": 1, "world_size": 4, "batches": 2},
        {"batch_size": 1, "world_size": 3, "batches": 1},
    ]
    last = _consume(_loaders(folder, 2, 2, state2), None)
    # (Within a stretch a sample repeats only as padding of a short global batch.)
    first, then, rest = ({p for p, _ in part} for part in (consumed, second, last))
    assert not first & then and not (first | then) & rest
    assert sorted(first | then | rest) == files
    # A state that does not fit the epoch is refused when loaded.
    bad = {**state, "segments": [{"batch_size": 1, "world_size": 4, "batches": 99}]}
    with pytest.raises(ValueError, match="consumed 99 global batches"):
        _loaders(folder, 2, 1, bad)


#: Every run: everything random (random crops, flips, caption dropout, offset noise), 2 micro-batches
#: per step, one thread.
TRAIN_ARGS = [
    *("--gradient-accumulation-steps", "2", "--crop", "random", "--flip-prob", "0.5"),
    *("--caption-dropout", "0.3", "--noise-offset", "0.05"),
    *("--device", "cpu", "--torch-threads", "1", "--num-threads", "1", "--seed", "7"),
]
#: The tiny from-scratch run: 12 images in one 64x64 bucket, so global batches of 4 divide every epoch
#: (3 per epoch: the checkpoint at step 2 is one batch into epoch 1).
TINY_ARGS = [
    *("--resolution", "64", "--bucket-step", "64", "--unet-channels", "16", "32"),
    *("--max-steps", "4", "--checkpoint-every", "2"),
]


def _train(data: Path, output: Path, *extra: str, ranks: int = 1, logs: Path | None = None) -> None:
    """``fastdiff train`` as users start it: ``python -m fastdiff``, or torchrun with ``ranks`` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        if logs is not None:
            launcher += ["--log-dir", str(logs), "--redirects", "3"]
    argv = ["-m", "fastdiff", "train", "--data", str(data), "--output", str(output), *TRAIN_ARGS, *extra]
    proc = subprocess.run([*launcher, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def _losses(output: Path) -> dict[int, float]:
    rows = (output / "loss.csv").read_text().split()[1:]
    return {int(r.split(",")[0]): float(r.split(",")[1]) for r in rows}


def _weights(output: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        f"{part}.{k}": v
        for part in ("unet", "text_encoder")
        for k, v in load_file(next((output / part).glob("*.safetensors"))).items()
    }


@pytest.fixture(scope="module")
def two_rank_run(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, output, per-rank logs) of ``torchrun --nproc_per_node 2 -m fastdiff train`` at batch 2."""
    root = tmp_path_factory.mktemp("ddp")
    data = smallest(wallpapers, root / "data", 12)
    _train(data, root / "two", *TINY_ARGS, "--batch-size", "2", ranks=2, logs=root / "logs")
    return data, root / "two", root / "logs"


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_global_batch(two_rank_run: tuple[Path, Path, Path]) -> None:
    data, two, _ = two_rank_run
    one = two.parent / "one"
    _train(data, one, *TINY_ARGS, "--batch-size", "4")
    # Same samples per step, same draws (made for the global batch on every rank); only the float
    # summation order differs (DDP averages two half-batch gradients: ~1e-7 relative in fp32).
    a, b = _losses(two), _losses(one)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step  # loss.csv rounds to 6 digits
    wa, wb = _weights(two), _weights(one)
    assert wa.keys() == wb.keys()
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    # Adam divides each gradient by its running RMS, so a weight whose gradient is near 0 moves by a
    # rounding-sensitive part of a step (at most lr = 1e-3 per step): bound the worst weight by a tenth
    # of one step (measured 1.5e-5 after 4 steps) and the mean by 1e-7 (measured 6e-9).
    assert float(diff.max()) < 1e-4 and float(diff.mean()) < 1e-7, (float(diff.max()), float(diff.mean()))


def test_rank_zero_alone_writes_logs_checkpoints_and_outputs(
    two_rank_run: tuple[Path, Path, Path],
) -> None:
    _, two, logs = two_rank_run
    assert sorted(p.name for p in two.iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "loss.csv",
        "loss.png",
        "loss_by_timestep.csv",
        "loss_by_timestep.png",
        "scheduler",
        "spikes.jsonl",
        "text_encoder",
        "tokenizer",
        "train_config.json",
        "unet",
    ]
    assert list(_losses(two)) == [1, 2, 3, 4]  # one writer: every step once
    state = torch.load(two / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    loader = json.loads((two / "checkpoint-2" / "loader.json").read_text())
    assert loader["segments"] == [{"batch_size": 2, "world_size": 2, "batches": 1}]
    assert loader["epoch"] == 1
    # Rank 0 alone prints the summary, the progress bar and the log lines.
    outs = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    errs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(outs) == [0, 1]
    assert "trained steps 1-4" in outs[0] and "trained steps" not in outs[1]
    assert "train:" in errs[0] and "train:" not in errs[1]


@pytest.mark.slow
def test_resume_under_torchrun_reproduces_the_uninterrupted_run(
    two_rank_run: tuple[Path, Path, Path],
) -> None:
    data, two, _ = two_rank_run
    resumed = two.parent / "resumed"
    _train(data, resumed, *TINY_ARGS, "--batch-size", "2", "--resume", str(two / "checkpoint-2"), ranks=2)
    full = _losses(two)
    assert _losses(resumed) == {3: full[3], 4: full[4]}  # bit-exact (as written to 6 digits)
    wa, wb = _weights(resumed), _weights(two)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_on_loopback_train_as_one_node_with_two_ranks(
    two_rank_run: tuple[Path, Path, Path],
) -> None:
    # Two torchrun launchers, one per "node" (one process each), meeting at a c10d rendezvous on
    # 127.0.0.1: the same job as the 1-node, 2-process fixture run.
    data, two, _ = two_rank_run
    nodes = two.parent / "nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "fastdiff-test"]
    argv = ["-m", "fastdiff", "train", "--data", str(data), "--output", str(nodes), *TRAIN_ARGS, *TINY_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [*launcher, "--node_rank", str(node), *argv, "--batch-size", "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    assert "trained steps 1-4" in outputs[0][0] and "trained steps" not in outputs[1][0]
    assert sorted(p.name for p in nodes.iterdir()) == sorted(p.name for p in two.iterdir())
    assert sorted(p.name for p in nodes.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert _losses(nodes) == _losses(two)
    wa, wb = _weights(nodes), _weights(two)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_changed_batch_size_resumes_at_the_step_of_the_samples_seen(
    wallpapers: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fastdiff.training.config import TrainConfig
    from fastdiff.training.run import train

    data = smallest(wallpapers, tmp_path / "data", 12)
    base = TrainConfig(
        data=data,
        output=tmp_path / "four",
        resolution=64,
        bucket_step=64,
        batch_size=4,
        max_steps=2,
        checkpoint_every=2,
        unet_channels=(16, 32),
        device="cpu",
        torch_threads=1,
        num_threads=1,
    )
    train(base)
    state = json.loads((tmp_path / "four" / "checkpoint-2" / "loader.json").read_text())
    assert state["segments"] == [{"batch_size": 4, "world_size": 1, "batches": 2}]
    # 2 steps of 4 samples are 4 steps of 2: the run goes on at step 5, over the epoch's last 4 samples.
    resumed = replace(base, output=tmp_path / "two", batch_size=2, max_steps=6, resume=tmp_path / "four")
    with caplog.at_level(logging.WARNING, logger="fastdiff.train"):
        result = train(resumed)
    assert result.first_step == 5 and len(result.losses) == 2
    assert "its step 2 (8 samples seen) is step 4 here" in caplog.text
    after = json.loads((tmp_path / "two" / "checkpoint-6" / "loader.json").read_text())
    assert after["epoch"] == 1 and after["segments"] == [{"batch_size": 2, "world_size": 1, "batches": 0}]


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [4, 0])
def test_stable_diffusion_on_two_ranks_matches_one_process(
    wallpapers: Path, tmp_path: Path, lora_rank: int
) -> None:
    from tiny_sd import build_sd15

    # LoRA and full fine-tune of a tiny SD 1.x pipeline: VAE latents drawn, caption dropout, min-SNR.
    model = build_sd15(tmp_path / "sd15")
    data = smallest(wallpapers, tmp_path / "data", 8)
    sd = ["--model", str(model), "--resolution", "32", "--bucket-step", "32", "--learning-rate", "1e-3"]
    sd += ["--lora-rank", str(lora_rank), "--snr-gamma", "5", "--max-steps", "2", "--checkpoint-every", "0"]
    _train(data, tmp_path / "two", *sd, "--batch-size", "2", ranks=2)
    _train(data, tmp_path / "one", *sd, "--batch-size", "4")
    a, b = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert a.keys() == b.keys() == {1, 2}
    assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a), (a, b)
