"""The accelerate / diffusers drop-in: ``device=`` (batches on the device, copied one batch ahead),
``tokenizer=`` / ``tokenizers=`` (``input_ids`` as the diffusers scripts make them) and resuming through
``accelerator.register_for_checkpointing`` (``save_state`` / ``load_state``)."""

from __future__ import annotations

import os
from pathlib import Path

import fastdiff
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import write_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 PNGs of noise in two aspect ratios, with captions of different lengths (one empty)."""
    root = tmp_path_factory.mktemp("acc")
    rng = np.random.default_rng(1)
    for i in range(12):
        w, h = [(64, 64), (96, 48)][i % 2]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02}.png")
        (root / f"{i:02}.txt").write_text("" if i == 3 else "a photo of noise " * (i + 1))
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path_factory.mktemp("tok")))


def loader(folder: Path, **kw: object) -> fastdiff.DataLoader:
    opts: dict = {"resolution": 64, "bucket_step": 16, "batch_size": 2, "num_threads": 2, "seed": 3}
    return fastdiff.DataLoader(folder, **(opts | kw))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_cuda_device_without_cuda_warns_and_yields_cpu_batches(folder: Path) -> None:
    with pytest.warns(UserWarning, match="device='cuda' but CUDA is not available"):
        dl = loader(folder, device="cuda")
    assert dl.device is None and not dl.pin_memory
    reference = list(loader(folder))
    for a, b in zip(dl, reference, strict=True):
        assert a["pixel_values"].device.type == "cpu" and torch.equal(a["pixel_values"], b["pixel_values"])


def test_cpu_device_is_host_memory_without_a_warning(folder: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dl = loader(folder, device=torch.device("cpu"))
    assert dl.device is None
    batches = list(dl)
    assert len(batches) == len(dl) == 6 and all(b["pixel_values"].device.type == "cpu" for b in batches)


def test_device_refuses_what_is_not_a_device(folder: Path) -> None:
    with pytest.raises(ValueError, match=r"^device must be a torch.device or a device string"):
        loader(folder, device="gpu0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_arrive_on_the_device_equal_and_resume_where_handed_out(folder: Path) -> None:
    reference = list(loader(folder))
    dl = loader(folder, device="cuda")
    assert dl.pin_memory
    seen = []
    for k, batch in enumerate(dl):
        assert batch["pixel_values"].device.type == "cuda" and batch["is_reg"].device.type == "cuda"
        # Work on the consumer's stream meanwhile the next batch is being copied.
        seen.append((batch["pixel_values"] * 2).cpu())
        if k == 2:
            # One batch is copied ahead, but the state is where the consumer is.
            assert dl.state_dict()["batches_consumed"] == 3
    for got, want in zip(seen, reference, strict=True):
        assert torch.equal(got, want["pixel_values"] * 2)
    assert dl.state_dict()["epoch"] == 1 and dl.state_dict()["batches_consumed"] == 0


def test_input_ids_are_the_tokenizers_own(folder: Path, tokenizer: object) -> None:
    for batch in loader(folder, tokenizer=tokenizer):
        want = tokenizer(  # type: ignore[operator]
            batch["captions"],
            max_length=tokenizer.model_max_length,  # type: ignore[attr-defined]
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        assert batch["input_ids"].dtype == torch.int64
        assert batch["input_ids"].shape == (2, tokenizer.model_max_length)  # type: ignore[attr-defined]
        assert torch.equal(batch["input_ids"], want)


def test_two_tokenizers_give_input_ids_and_input_ids_2(
    folder: Path, tokenizer: object, tmp_path: Path
) -> None:
    from transformers import CLIPTokenizer

    second = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path), model_max_length=9)
    batch = next(iter(loader(folder, tokenizers=[tokenizer, second])))
    assert batch["input_ids"].shape[1] == tokenizer.model_max_length  # type: ignore[attr-defined]
    assert batch["input_ids_2"].shape == (2, 9)
    want = second(batch["captions"], max_length=9, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(batch["input_ids_2"], want.input_ids)
    with pytest.raises(ValueError, match="give tokenizer or tokenizers, not both"):
        loader(folder, tokenizer=tokenizer, tokenizers=[second])
    with pytest.raises(ValueError, match=r"^tokenizer must be a fastdiff.types.Tokenizer"):
        loader(folder, tokenizer="openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match=r"^tokenizers must be a non-empty sequence"):
        loader(folder, tokenizers=[])


def test_accelerate_save_state_and_load_state_restore_the_loader_position(
    folder: Path, tmp_path: Path
) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    dl = loader(folder)
    accelerator.register_for_checkpointing(dl)
    reference = [b["paths"] for b in loader(folder)]
    it = iter(dl)
    head = [next(it)["paths"] for _ in range(4)]
    accelerator.save_state(str(tmp_path / "ckpt"))
    assert head == reference[:4]

    fresh = Accelerator(cpu=True)
    resumed = loader(folder)
    fresh.register_for_checkpointing(resumed)
    fresh.load_state(str(tmp_path / "ckpt"))
    assert resumed.state_dict()["batches_consumed"] == 4
    assert [b["paths"] for b in resumed] == reference[4:]


SCRIPT = Path(__file__).with_name("accelerate_script.py")


def launch(processes: int, pipeline: Path, data: Path, output: Path, *extra: str) -> None:
    """Run tests/accelerate_script.py under ``accelerate launch --cpu`` (gloo on loopback)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # accelerate 1.16 runs `--cpu --num_processes 2` as one process; several CPU processes (gloo) are
    # its multi-GPU launcher (torchrun) with ACCELERATE_USE_CPU and no visible GPU.
    where = ["--cpu"] if processes == 1 else ["--multi_gpu"]
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", *where, "--num_processes", str(processes)),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_ip", "127.0.0.1", "--main_process_port", str(port)),
        *(str(SCRIPT), str(pipeline), str(data), str(output), *extra),
    ]
    env = {
        **os.environ,
        **{
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "ACCELERATE_USE_CPU": "1",
            "CUDA_VISIBLE_DEVICES": "",
        },
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def steps(output: Path, rank: int) -> list[dict]:
    import json

    return [json.loads(line) for line in (output / f"steps-{rank}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_sd import build_sd15

    return build_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 captioned 32x32 PNGs: 6 steps per epoch on one process, 3 on two."""
    root = tmp_path_factory.mktemp("six")
    rng = np.random.default_rng(2)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"photo number {i}")
    return root


@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_launch_trains_and_resumes_as_an_uninterrupted_run(
    processes: int, tiny_pipeline: Path, six: Path, tmp_path: Path
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir(), resumed.mkdir()
    launch(processes, tiny_pipeline, six, whole, "--max-steps", "8", "--save-every", "4")
    launch(
        processes, tiny_pipeline, six, resumed, "--max-steps", "8", "--resume", str(whole / "checkpoint-4")
    )
    per_epoch = 6 // processes
    for rank in range(processes):
        run, rest = steps(whole, rank), steps(resumed, rank)
        assert [s["step"] for s in run] == list(range(1, 9)) and [s["step"] for s in rest] == list(
            range(5, 9)
        )
        assert [s["epoch"] for s in run] == [(k - 1) // per_epoch for k in range(1, 9)]
        for s in run:
            assert s["devices"] == [s["expected_device"]] == ["cpu"]
            assert s["ranks"] == [rank, processes, rank, processes]  # the loader's and accelerate's
            assert s["input_ids_shape"] == [1, 16]  # tiny_sd's model_max_length
        # The resumed run continues with the very batches (and, model and optimizer restored, losses).
        assert [s["paths"] for s in rest] == [s["paths"] for s in run[4:]]
        assert [s["loss"] for s in rest] == pytest.approx([s["loss"] for s in run[4:]], rel=1e-5)
    # Each epoch every image once, split across the ranks.
    for epoch in range(8 // per_epoch):
        seen = [
            p for r in range(processes) for s in steps(whole, r) if s["epoch"] == epoch for p in s["paths"]
        ]
        assert sorted(seen) == [f"{i}.png" for i in range(6)]
