"""``fastdiff demo``: the synthetic data set, a short end-to-end run, and (slow) the full default run."""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import fastdiff
import pytest
import torch
from fastdiff.training import demo
from PIL import Image


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """The demo sets torch's thread count process-wide: give the tests after it the count they had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    return parser.parse_args(argv)


def run_demo_cli(argv: list[str]) -> int:
    return demo.run_demo(parse(argv))


def test_every_demo_config_field_is_a_cli_flag() -> None:
    args = parse([])
    assert set(vars(args)) == {f.name for f in fields(demo.DemoConfig)}
    assert demo.DemoConfig(**vars(args)) == demo.DemoConfig()


def check_outputs(out: Path, steps: int) -> None:
    with (out / "loss.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss", "grad_norm", "lr"]
    assert len(rows) == steps + 1
    assert all(math.isfinite(float(loss)) for _, loss, _, _ in rows[1:])
    with (out / "val_loss.csv").open(newline="") as f:
        val = list(csv.reader(f))
    assert val[0] == ["step", "val_loss", "images"]
    assert [int(r[0]) for r in val[1:]] == list(range(100, steps + 1, 100)) + ([steps] if steps % 100 else [])
    assert all(math.isfinite(float(r[1])) and int(r[2]) > 0 for r in val[1:])
    for png in ("loss.png", "samples.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG"
    assert (out / "samples.txt").read_text().splitlines() == list(demo.SAMPLE_CAPTIONS)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_dataset_has_every_caption_in_jpeg_and_png_and_three_buckets(tmp_path: Path) -> None:
    data = demo.prepare_data_dir(tmp_path / "data")
    captions = demo.make_shapes_dataset(data, images_per_caption=3, seed=0)
    assert len(captions) == 3 * len(demo.all_captions())
    assert set(demo.SAMPLE_CAPTIONS) <= set(captions)
    images = sorted(p for p in data.iterdir() if p.suffix in {".jpg", ".png"})
    assert {p.suffix for p in images} == {".jpg", ".png"}
    assert [p.with_suffix(".txt").read_text().strip() for p in images] == captions
    background = captions[0].split()[-2]
    with Image.open(images[0]) as im:
        assert im.getpixel((0, 0)) == pytest.approx(demo.COLOURS[background], abs=8)
    loader = fastdiff.DataLoader(data, resolution=demo.RESOLUTION, bucket_step=demo.BUCKET_STEP)
    assert len(loader.report["images_per_bucket"]) == 3


def test_rerun_replaces_its_own_data_but_refuses_a_foreign_folder(tmp_path: Path) -> None:
    data = demo.prepare_data_dir(tmp_path / "data")
    (data / "old.txt").write_text("stale")
    assert list(demo.prepare_data_dir(tmp_path / "data").iterdir()) == [data / demo.MARKER]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.jpg").write_bytes(b"")
    with pytest.raises(FileExistsError):
        demo.prepare_data_dir(tmp_path / "mine")
    assert (tmp_path / "mine" / "photo.jpg").exists()


def test_short_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps = 120
    argv = [
        "--output",
        str(tmp_path),
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--images-per-caption",
        "1",
    ]
    assert run_demo_cli([*argv, "--samples-per-caption", "2", "--sample-steps", "5"]) == 0
    check_outputs(tmp_path, steps)
    assert "OK" in capsys.readouterr().out


@pytest.mark.slow
def test_full_default_demo_within_ten_minutes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    assert run_demo_cli(["--output", str(tmp_path)]) == 0
    seconds = time.perf_counter() - start
    check_outputs(tmp_path, demo.DemoConfig.steps)
    assert seconds < 600, f"demo took {seconds:.0f} s"
    with capsys.disabled():
        print(f"\nfull demo: {seconds:.1f} s")


#: A ``sitecustomize`` that makes ``tokenizers`` look not installed: it takes the place of the path-based
#: finder and refuses that one name, so ``importlib.util.find_spec`` returns ``None`` and an import
#: raises ``ModuleNotFoundError``, exactly as in a venv without the package.
HIDE_TOKENIZERS = """
import sys
from importlib.machinery import PathFinder


class HideTokenizers:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "tokenizers" or name.startswith("tokenizers."):
            return None
        return PathFinder.find_spec(name, path, target)

    @classmethod
    def invalidate_caches(cls):
        PathFinder.invalidate_caches()


sys.meta_path[sys.meta_path.index(PathFinder)] = HideTokenizers
"""

#: Times ``fastdiff.cli.main`` alone (the interpreter start excluded) and says whether torch was imported.
TIMED_MAIN = """
import sys, time
from fastdiff.cli import main
start = time.perf_counter()
status = main(sys.argv[1:])
print(f"main: {time.perf_counter() - start:.3f} s, torch imported: {'torch' in sys.modules}", file=sys.stderr)
sys.exit(status)
"""


def test_demo_without_the_train_extra_says_so_in_one_line_at_once(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_TOKENIZERS)
    # The hiding site first, then where this fastdiff was imported from (a source tree or site-packages).
    package_root = str(Path(fastdiff.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), package_root])}
    out = tmp_path / "out"
    hidden = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('tokenizers'))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert hidden.stdout.strip() == "None"  # the finder works: the package looks missing

    start = time.perf_counter()
    cli = subprocess.run(
        [sys.executable, "-m", "fastdiff", "demo", "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    assert cli.returncode == 2
    assert cli.stderr.splitlines() == [
        "fastdiff demo: error: needs the train extra: pip install 'fastdiff[train]' (missing: tokenizers)"
    ]
    assert cli.stdout == ""
    assert not out.exists()  # nothing was started

    timed = subprocess.run(
        [sys.executable, "-c", TIMED_MAIN, "demo", "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert timed.returncode == 2
    last = timed.stderr.splitlines()[-1]
    own = float(last.split()[1].rstrip(","))
    print(
        f"\nfastdiff demo without tokenizers: exit 2 after {seconds:.2f} s (interpreter included), "
        f"{own:.3f} s in main"
    )
    assert last.endswith("torch imported: False")  # the refusal waits for no heavy import
    assert own < 1.0
    assert seconds < 10  # a bare interpreter start (and numpy) on a loaded 2-core machine


def test_help_needs_no_extra(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_TOKENIZERS)
    package_root = str(Path(fastdiff.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), package_root])}
    cli = subprocess.run(
        [sys.executable, "-m", "fastdiff", "train", "--help"], env=env, capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    assert "--max-steps" in cli.stdout


def test_the_extras_check_knows_every_package_of_the_train_extra() -> None:
    import tomllib
    from fastdiff.cli import TRAIN_MODULES

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    train = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["train"]
    # Distribution names as pip knows them -> the name they are imported by.
    import_names = {"pillow": "PIL"}
    names = {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower() for r in train}
    # Every package of the extra is checked (tokenizers too, which comes with transformers).
    assert {import_names.get(n, n) for n in names} <= set(TRAIN_MODULES)
    assert len(names) == len(train) == 7
