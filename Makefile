# The few commands everyone uses. `make demo` and `make test` work on a fresh Debian/Ubuntu machine with
# Rust and Python >= 3.10: they install what is missing (cmake + nasm for libjpeg-turbo's SIMD build, a
# venv with torch and the rest), build the extension as a release wheel and install it into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WHEEL_STAMP := $(VENV)/.fastdiff-wheel
RUST_SOURCES := $(shell find rust -name '*.rs' -o -name Cargo.toml) Cargo.toml Cargo.lock
PY_SOURCES := $(shell find python -type f -not -name '*.pyc' -not -path '*/__pycache__/*')

.PHONY: setup wheel develop demo test test-fast test-rust test-python lint typecheck fmt corpus bench bench-cache fuzz clean

setup: $(WHEEL_STAMP)

# System build dependencies of the vendored libjpeg-turbo (its SIMD code needs NASM).
$(VENV)/.sysdeps:
	@command -v cargo >/dev/null || { echo "error: Rust is needed to build fastdiff (https://rustup.rs)"; exit 1; }
	@command -v cmake >/dev/null && command -v nasm >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake nasm; }
	@mkdir -p $(VENV) && touch $@

# Python dependencies: the package's `dev` extra (torch, diffusers, pytest, Pillow, maturin, ziglang and
# auditwheel for the wheel, s3fs, pyarrow and moto for remote datasets, ...), not the package.
$(VENV)/.deps: pyproject.toml $(VENV)/.sysdeps
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(d['dependencies'] + d['optional-dependencies']['train'] + d['optional-dependencies']['remote'] + \
	  [r for r in d['optional-dependencies']['dev'] if not r.startswith('fastdiff')]))" > $(VENV)/requirements.txt
	$(BIN)/pip install -q -r $(VENV)/requirements.txt
	@touch $@

# The release wheel that ships, installed as a user would install it (not editable): `make setup` and
# `make wheel` build it with this one recipe, so what the tests check is what users get. abi3 (one wheel for
# CPython >= 3.10), linked by zig (the dev extra's `ziglang`; maturin's --zig) against glibc 2.28's symbol
# versions, whatever glibc this machine has: tagged manylinux_2_28, it installs on RHEL/Rocky 8, Ubuntu
# 20.04, Debian 11 and newer. The vendored libjpeg-turbo is compiled by zig cc too (maturin hands cmake a
# zig toolchain file) with its NASM SIMD code (turbojpeg's `require-simd`: no SIMD fails the build).
# maturin runs that zig as `python -m ziglang` with the venv's python (CARGO_ZIGBUILD_PYTHON_PATH: the
# venv is not on PATH here). It refuses the tag if the .so needs a newer symbol; `auditwheel show` prints
# what the wheel needs, and tests/test_wheel.py checks the tag and the GLIBC versions the .so requires.
WHEEL_PLATFORM := manylinux_2_28
$(WHEEL_STAMP): $(VENV)/.deps $(RUST_SOURCES) $(PY_SOURCES) pyproject.toml
	rm -rf target/wheels
	CARGO_ZIGBUILD_PYTHON_PATH=$(abspath $(BIN)/python) $(BIN)/maturin build --release --zig \
	  --compatibility $(WHEEL_PLATFORM) -i $(BIN)/python --quiet -o target/wheels
	$(BIN)/auditwheel show target/wheels/fastdiff-*.whl
	$(BIN)/pip install -q --force-reinstall --no-deps target/wheels/fastdiff-*.whl
	@touch $@

# What a release uploads, in target/wheels: that wheel and the sdist (`pip install fastdiff-*.tar.gz`
# builds it with the local Rust toolchain, cmake and nasm; `pytest -m slow tests/test_wheel.py` checks it).
wheel: $(WHEEL_STAMP)
	$(BIN)/maturin sdist -o target/wheels

# Editable build for working on the code (`maturin develop`); `make setup` puts the wheel back.
develop: $(VENV)/.deps
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/maturin develop --release
	@rm -f $(WHEEL_STAMP)

demo: setup
	$(BIN)/fastdiff demo --output demo-out

# The CI gates (.ci/run), in order, each under a header with its time: the cheap checks first, so that a
# lint error does not wait for the release build. Sub-makes keep the order under `make -j` too.
TEST_GATES := lint typecheck test-rust test-python
test:
	@for gate in $(TEST_GATES); do \
	  echo "==== make $$gate"; start=$$(date +%s); \
	  $(MAKE) --no-print-directory $$gate || { echo "==== make $$gate: FAILED"; exit 1; }; \
	  echo "==== make $$gate: ok in $$(( $$(date +%s) - start )) s"; done

# The edit loop: no lint, no type checks, the wheel rebuilt only when the sources are newer than its stamp;
# the core's Rust tests, then pytest stopping at the first failure, last run's failures first.
test-fast: setup
	cargo test -p fastdiff-core
	$(call run_pytest,-x --ff)

test-rust: $(VENV)/.sysdeps
	cargo test --workspace --exclude fastdiff-py

# pytest's exit code 5 means it collected no test: a broken test path or marker, never a pass.
run_pytest = $(BIN)/python -m pytest -q $(1) || { rc=$$?; [ $$rc -ne 5 ] || echo "error: pytest collected no test"; exit $$rc; }
test-python: setup
	$(call run_pytest,)

lint: $(VENV)/.deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy on the package (settings: pyproject's [tool.mypy]), then the hand-written _fastdiff.pyi against the
# native module of the installed wheel (stubtest imports it: hence `setup`).
typecheck: setup
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest --mypy-config-file pyproject.toml fastdiff._fastdiff

fmt: $(VENV)/.deps
	cargo fmt --all
	$(BIN)/ruff format .

# The real-image corpora of the benches (scripts/corpus.py; the tests make theirs themselves), each made
# once from Debian's wallpapers: 1000 photos, 200 12 MP phone JPEGs. `make corpus BENCH_CORPORA=photos`
# makes one.
CORPUS ?= $(or $(FASTDIFF_CACHE),$(HOME)/.cache/fastdiff/corpus)
BENCH_CORPORA ?= photos large wallpapers
corpus: $(VENV)/.deps
	$(BIN)/python scripts/corpus.py wallpapers $(CORPUS)/wallpapers
	$(if $(filter photos,$(BENCH_CORPORA)),$(BIN)/python scripts/corpus.py photos $(CORPUS)/wallpapers $(CORPUS)/photos --n 1000)
	$(if $(filter large,$(BENCH_CORPORA)),$(BIN)/python scripts/corpus.py large $(CORPUS)/wallpapers $(CORPUS)/large --n 200)

# Side-by-side throughput (issue 3's table): the photos @ 512 batch 8, the phone JPEGs @ 1024 batch 4, the
# mixed-format wallpapers @ 512; with the bench-only peers (datago; PyTurboJPEG 1.x over Debian's
# libturbojpeg for the decode ceiling). About an hour on 2 cores; `make bench BENCH_CORPORA=photos` runs one row.
bench: setup corpus
	@dpkg -s libturbojpeg0 >/dev/null 2>&1 || $(SUDO) apt-get install -y -qq libturbojpeg0
	$(BIN)/pip install -q "datago" "PyTurboJPEG<2"
	@for c in $(BENCH_CORPORA); do case $$c in \
	  photos) args="--resolution 512 --batch-size 8 --rounds 5";; \
	  large) args="--resolution 1024 --batch-size 4 --rounds 3";; \
	  wallpapers) args="--resolution 512 --batch-size 8 --rounds 3";; \
	  *) echo "unknown corpus $$c"; exit 1;; esac; \
	  res=$$(echo $$args | cut -d' ' -f2); \
	  $(BIN)/python benches/side_by_side.py $(CORPUS)/$$c $$args \
	    --json benches/results/$$c-$$res.json --plot benches/results/$$c-$$res.png || exit 1; done

# Issue 11's table (benches/RESULTS.md): cached latents read against the peers' per-image files (SDXL and
# SD3/FLUX shapes) and a copy ceiling, a cached epoch against the pixel epoch on the phone JPEGs, and
# `fastdiff cache`'s build against the loader and the VAE alone. About 20 minutes on 2 cores.
bench-cache: setup
	$(MAKE) corpus BENCH_CORPORA=large
	$(BIN)/python benches/latent_cache.py --shape 4x128x128 --samples 2000 --rounds 3
	$(BIN)/python benches/latent_cache.py --shape 16x128x128 --samples 1000 --rounds 3
	$(BIN)/python benches/cached_epoch.py $(CORPUS)/large --resolution 1024 --rounds 3
	$(BIN)/python benches/cache_build.py $(CORPUS)/wallpapers --resolution 512 --vae-width 16 --rounds 3

# Longer fuzzing of probe + decode + transform than the seconds-long smoke run inside `cargo test`
# (knobs: header of rust/core/tests/fuzz.rs; FUZZ_SEEDS=DIR adds real files as seeds).
FUZZ_CASES ?= 5000000
FUZZ_SECONDS ?= 3600
FUZZ_SEED ?= $(shell date +%s)
fuzz:
	FASTDIFF_FUZZ_CASES=$(FUZZ_CASES) FASTDIFF_FUZZ_SECONDS=$(FUZZ_SECONDS) FASTDIFF_FUZZ_SEED=$(FUZZ_SEED) \
	  $(if $(FUZZ_SEEDS),FASTDIFF_FUZZ_SEEDS=$(FUZZ_SEEDS)) \
	  cargo test --release -p fastdiff-core --test fuzz -- --nocapture

clean:
	rm -rf $(VENV) target demo-out
