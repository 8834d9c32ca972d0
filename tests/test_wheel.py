"""The release wheel (``maturin build --release``, made by ``make setup``) installs into a fresh venv and
works there with no Rust toolchain on PATH."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def test_wheel_installs_into_fresh_venv_and_loads_without_rust(tmp_path: Path) -> None:
    wheels = sorted((REPO / "target" / "wheels").glob("fastdiff-*.whl"))
    if not wheels:
        pytest.fail("no wheel in target/wheels: `make setup` builds it with `maturin build --release`")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheels[-1]),
        ],
        check=True,
    )
    # numpy and torch come from this environment (a .pth appends them after the fresh site-packages,
    # so `fastdiff` itself resolves to the freshly installed wheel). Every site-packages on sys.path,
    # not just this venv's: a venv may itself reach its packages through a .pth, which is not
    # followed from an appended folder.
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dep_dirs = [sysconfig.get_paths()["purelib"]]
    dep_dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and p not in dep_dirs]
    Path(site, "deps.pth").write_text("\n".join(dep_dirs) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 40)).save(data / "red.png")
    (data / "red.txt").write_text("a red rectangle")
    code = (
        "import shutil, fastdiff, sys;"
        "assert shutil.which('cargo') is None and shutil.which('rustc') is None;"
        f"assert fastdiff.__file__.startswith({str(env_dir)!r}), fastdiff.__file__;"
        f"b = next(iter(fastdiff.DataLoader({str(data)!r}, resolution=64, bucket_step=16)));"
        "print(tuple(b['pixel_values'].shape), b['captions'][0])"
    )
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("CARGO", "RUSTUP", "VIRTUAL_ENV"))}
    clean_env["PATH"] = "/usr/bin:/bin"
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, env=clean_env)
    assert out.stdout.strip() == "(1, 3, 48, 80) a red rectangle"
