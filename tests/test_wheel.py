"""The release wheel that ``make setup`` builds and installs (``make wheel`` too: ``maturin build --release
--zig --compatibility manylinux_2_28``, see the Makefile) is portable: one abi3 wheel for CPython >= 3.10,
tagged manylinux_2_28 or older, whose extension needs no glibc symbol newer than 2.28 (RHEL/Rocky 8) and
still carries libjpeg-turbo's SIMD code; it installs into a fresh venv and works there with no Rust
toolchain on PATH. The sdist builds a wheel that works too (slow: a release build of the crates)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection
from packaging.utils import parse_wheel_filename
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# The oldest glibc the wheel is for: the Makefile's WHEEL_PLATFORM (manylinux_2_28: RHEL/Rocky 8).
MAX_GLIBC = (2, 28)
MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_x86_64")


def _built_wheel() -> Path:
    wheels = sorted((REPO / "target" / "wheels").glob("fastdiff-*.whl"))
    if not wheels:
        pytest.fail("no wheel in target/wheels: `make setup` (or `make wheel`) builds it")
    return wheels[-1]


def _install_and_load(wheel: Path, tmp_path: Path) -> None:
    """Installs ``wheel`` into a fresh venv and loads one batch there, with no Rust toolchain on PATH."""
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
            str(wheel),
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


def test_wheel_installs_into_fresh_venv_and_loads_without_rust(tmp_path: Path) -> None:
    _install_and_load(_built_wheel(), tmp_path)


def _glibc_versions_needed(so: Path) -> set[tuple[int, int]]:
    """The GLIBC_x.y symbol versions the dynamic linker must find (the ELF's .gnu.version_r entries)."""
    needed = set()
    with so.open("rb") as f:
        for section in ELFFile(f).iter_sections():
            if isinstance(section, GNUVerNeedSection):
                for _library, aux_entries in section.iter_versions():
                    for aux in aux_entries:
                        if m := re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", aux.name):
                            needed.add((int(m[1]), int(m[2])))
    return needed


def test_wheel_is_abi3_manylinux_2_28_and_needs_no_newer_glibc(tmp_path: Path) -> None:
    wheel = _built_wheel()
    _name, _version, _build, tags = parse_wheel_filename(wheel.name)
    platforms = set()
    for tag in tags:
        assert (tag.interpreter, tag.abi) == ("cp310", "abi3"), tag
        m = MANYLINUX.fullmatch(tag.platform)
        assert m, f"{wheel.name}: platform {tag.platform} is not manylinux_X_Y (a local linux_x86_64 build?)"
        platforms.add((int(m[1]), int(m[2])))
    assert max(platforms) <= MAX_GLIBC, wheel.name

    with zipfile.ZipFile(wheel) as zf:
        (member,) = [n for n in zf.namelist() if n.startswith("fastdiff/_fastdiff") and n.endswith(".so")]
        so = Path(zf.extract(member, tmp_path))
    needed = _glibc_versions_needed(so)
    assert needed, "the extension needs no versioned glibc symbol: not read from .gnu.version_r?"
    newest = "GLIBC_{}.{}".format(*max(needed))
    assert max(needed) <= min(platforms), f"{member} needs {newest}, tagged {sorted(platforms)}"
    # libjpeg-turbo's SIMD code is linked in (turbojpeg's `require-simd`; the .so has no symbol table): the
    # x86-64 SIMD dispatcher simd/x86_64/jsimd.c, built only with the NASM kernels, reads this variable.
    assert b"JSIMD_FORCEAVX2" in so.read_bytes()

    # auditwheel's own verdict: the most compatible policy the wheel's symbols and libraries allow.
    shown = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(wheel)], check=True, capture_output=True, text=True
    ).stdout
    shown = " ".join(shown.split())  # auditwheel wraps its lines
    policy = re.search(r'consistent with the following platform tag: "(manylinux_\d+_\d+_x86_64)"', shown)
    assert policy, shown
    m = MANYLINUX.fullmatch(policy[1])
    assert m and (int(m[1]), int(m[2])) <= MAX_GLIBC, shown


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sdist_builds_a_wheel_that_works(tmp_path: Path) -> None:
    """``maturin sdist``, then ``pip wheel`` of it as a user's ``pip install fastdiff-*.tar.gz`` would,
    offline: the sdist holds every crate, the lock file and the Python package. The crates.io dependencies
    are compiled into the usual target folder (shared with ``cargo``); fastdiff's own crates come from the
    unpacked sdist."""
    maturin = shutil.which("maturin", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert maturin, "maturin is not installed (the dev extra has it)"
    subprocess.run([maturin, "sdist", "-o", str(tmp_path / "sdist")], cwd=REPO, check=True)
    (sdist,) = (tmp_path / "sdist").glob("fastdiff-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"Cargo.lock", "rust/core/Cargo.toml", "rust/py/Cargo.toml", "python/fastdiff/py.typed"} <= names

    env = dict(os.environ, CARGO_NET_OFFLINE="true")
    env.setdefault("CARGO_TARGET_DIR", str(REPO / "target"))
    env["PATH"] = f"{Path(maturin).parent}:{env.get('PATH', '')}"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps"]
    subprocess.run([*pip_wheel, "--no-index", "-w", str(tmp_path / "built"), str(sdist)], check=True, env=env)
    (built,) = (tmp_path / "built").glob("fastdiff-*.whl")
    _install_and_load(built, tmp_path)
