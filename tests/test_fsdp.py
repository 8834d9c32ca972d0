"""``--fsdp`` (FSDP2, ``fully_shard``) under ``torchrun --nproc_per_node 2`` (gloo, CPU) on the tiny
from-scratch path: the same weights as the DDP run, full checkpoints written by rank 0 alone, exact
resume; and the runs it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastdiff.training.config import TrainConfig
from test_distributed import TINY_ARGS, _losses, _train, _weights
from test_resume import smallest


@pytest.fixture(scope="module")
def runs(wallpapers: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, DDP output, FSDP output) of 2-rank runs at batch 2 per rank."""
    root = tmp_path_factory.mktemp("fsdp")
    data = smallest(wallpapers, root / "data", 12)
    _train(data, root / "ddp", *TINY_ARGS, "--batch-size", "2", ranks=2)
    _train(data, root / "fsdp", *TINY_ARGS, "--batch-size", "2", "--fsdp", ranks=2)
    return data, root / "ddp", root / "fsdp"


@pytest.mark.slow
def test_fsdp_trains_the_weights_ddp_trains(runs: tuple[Path, Path, Path]) -> None:
    _, ddp, fsdp = runs
    a, b = _losses(fsdp), _losses(ddp)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a), (a, b)
    wa, wb = _weights(fsdp), _weights(ddp)
    assert wa.keys() == wb.keys()
    assert all(wa[k].shape == wb[k].shape for k in wa)  # full weights, not a rank's shard
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff < 1e-5, diff


@pytest.mark.slow
def test_fsdp_checkpoints_are_full_weights_and_resume_exactly(runs: tuple[Path, Path, Path]) -> None:
    from safetensors.torch import load_file

    data, ddp, fsdp = runs
    # One writer (rank 0): the same files as the DDP run, checkpoints included.
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in ddp.iterdir())
    full, replicated = (load_file(o / "checkpoint-2" / "trainable.safetensors") for o in (fsdp, ddp))
    assert full.keys() == replicated.keys()
    assert all(full[k].shape == replicated[k].shape for k in full)
    assert max(float((full[k] - replicated[k]).abs().max()) for k in full) < 1e-5
    state = torch.load(fsdp / "checkpoint-2" / "training_state.pt", weights_only=True)
    moments = state["optimizer"]["state"]
    assert moments["unet.conv_in.weight"]["exp_avg"].shape == full["unet.conv_in.weight"].shape

    resumed = fsdp.parent / "resumed"
    resume = ("--resume", str(fsdp / "checkpoint-2"))
    _train(data, resumed, *TINY_ARGS, "--batch-size", "2", "--fsdp", *resume, ranks=2)
    assert _losses(resumed) == {3: _losses(fsdp)[3], 4: _losses(fsdp)[4]}
    wa, wb = _weights(resumed), _weights(fsdp)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model": Path("sd"), "lora_rank": 4}, "fsdp with lora_rank"),
        ({"ema_decay": 0.99}, "fsdp with ema_decay"),
        ({"use_8bit_adam": True}, "fsdp with use_8bit_adam"),
        ({"mixed_precision": "fp16"}, "fsdp with mixed_precision 'fp16'"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(data=Path("d"), output=Path("o"), fsdp=True, **settings)
