"""The option schema (fastdiff.options) and what derives from it: signatures, checks, TOML keys, scan
flags, saved state, docstrings, the README table; the typed dicts against the dicts handed out; layers."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any

import fastdiff
import numpy as np
import pytest
import torch
from fastdiff import dataset, docs, options, scan, types
from fastdiff.options import LOADER_OPTIONS, SUBSET_OPTIONS, Option
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "fastdiff"
START, END = "<!-- options-table:start -->", "<!-- options-table:end -->"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two small images (one with a caption) and a PNG whose header reads but whose data is cut."""
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"g{i}.png")
    (tmp_path / "g0.txt").write_text("a caption")
    data = (tmp_path / "g0.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 3])
    return tmp_path


def test_readme_holds_the_table_rendered_from_the_schema() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1
    block = text[text.index(START) + len(START) : text.index(END)]
    assert block == "\n" + docs.markdown_table() + "\n", (
        "README.md's options table is out of date: replace the lines between the markers by the output "
        'of python -c "from fastdiff.docs import markdown_table; print(markdown_table())"'
    )
    for o in (*LOADER_OPTIONS, *SUBSET_OPTIONS):
        assert f"| `{o.name}` |" in block


def test_dataloader_signature_is_the_schema() -> None:
    params = list(inspect.signature(fastdiff.DataLoader.__init__).parameters.values())
    assert [p.name for p in params[:3]] == ["self", "root", "subsets"]
    hints = typing.get_type_hints(fastdiff.DataLoader.__init__)
    assert [p.name for p in params[3:]] == [o.name for o in LOADER_OPTIONS]
    for p, o in zip(params[3:], LOADER_OPTIONS, strict=True):
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, o.name
        assert p.default == o.default and type(p.default) is type(o.default), o.name
        assert hints[o.name] == o.annotation, o.name


def test_subset_fields_are_the_schema() -> None:
    fields = dataclasses.fields(fastdiff.Subset)
    hints = typing.get_type_hints(fastdiff.Subset)
    assert [f.name for f in fields] == [o.name for o in SUBSET_OPTIONS]
    for f, o in zip(fields, SUBSET_OPTIONS, strict=True):
        assert f.default is o.default or (f.default == o.default and type(f.default) is type(o.default))
        assert hints[o.name] == o.annotation, o.name
    # A subset's flip_prob / crop override the loader's: the same check, None = the loader's value.
    for name in ("flip_prob", "crop"):
        loader, subset = options.LOADER[name], options.SUBSET[name]
        assert subset.allowed == loader.allowed and subset.maximum == loader.maximum
        assert subset.annotation == loader.annotation | None and subset.default is None


def test_docstrings_document_every_option_from_the_schema() -> None:
    for cls, opts in ((fastdiff.DataLoader, LOADER_OPTIONS), (fastdiff.Subset, SUBSET_OPTIONS)):
        doc = inspect.getdoc(cls)
        assert doc is not None and docs.ARGS_MARKER not in doc
        args = doc[doc.index("Args:") :]
        for o in opts:
            entry = re.search(rf"^    {o.name}: ", args, re.M)
            assert entry is not None, (cls.__name__, o.name)
            # It starts with the option's one-line doc (wrapped: compare the words).
            words = " ".join(args[entry.end() :].split())
            assert words.startswith(o.doc), o.name


def bad_values(o: Option) -> list[Any]:
    """Values ``o`` must refuse: the wrong type, and each side of its range."""
    out: list[Any] = [object()]
    if o.kind in ("int", "float"):
        out.append(True)  # a bool is not a number here
        if o.minimum is not None:
            out.append(o.minimum - 1)
        if o.maximum is not None:
            out.append(o.maximum + 0.5)
        if o.bits is not None:
            out.append(2**o.bits)
    if o.kind == "float":
        out.append(float("nan"))
    if o.kind == "choice":
        out.append("no such choice")
    if o.kind == "ints":
        out += [(1, 2), (0, 0, 256), (0, 0, -1)]
    if o.kind == "strs":
        out.append(".txt")
    return out


@pytest.mark.parametrize("o", LOADER_OPTIONS, ids=lambda o: o.name)
def test_every_loader_option_refuses_bad_values_naming_itself(folder: Path, o: Option) -> None:
    for value in bad_values(o):
        with pytest.raises(ValueError, match=rf"^{o.name} must "):
            fastdiff.DataLoader(folder, **{o.name: value})


@pytest.mark.parametrize("o", SUBSET_OPTIONS, ids=lambda o: o.name)
def test_every_subset_option_refuses_bad_values_naming_itself(folder: Path, o: Option) -> None:
    for value in bad_values(o):
        kwargs = {"image_dir": folder, o.name: value}
        prefix = "" if o.name == "image_dir" else re.escape(str(folder)) + ": "
        with pytest.raises(ValueError, match=rf"^{prefix}{o.name} must "):
            fastdiff.DataLoader(subsets=[fastdiff.Subset(**kwargs)])


def test_numpy_scalars_and_sequences_are_accepted(folder: Path) -> None:
    loader = fastdiff.DataLoader(
        folder,
        resolution=np.int64(64),
        flip_prob=np.float32(0.5),
        shuffle=np.bool_(False),
        background=np.array([1, 2, 3]),
        caption_extensions=[".txt"],
        num_threads=1,
    )
    assert len(loader) == 3


def other(o: Option) -> Any:
    """A valid value of ``o`` other than its default, as TOML can hold it."""
    if o.kind == "choice":
        return o.allowed[-1]  # the defaults come first
    if o.kind == "path":
        return "some/folder"
    if o.kind == "bool":
        return not o.default
    if o.kind == "int":
        return int(o.default or o.minimum or 0) + 1
    return {"float": 0.5, "str": "x"}[o.kind]


def test_every_toml_key_and_alias_reaches_its_option() -> None:
    general = {o.name: other(o) for o in LOADER_OPTIONS if "[general]" in o.toml}
    defaults = {o.name: other(o) for o in SUBSET_OPTIONS if "[general]" in o.toml}
    per_subset = {o.name: other(o) for o in SUBSET_OPTIONS if "[[datasets.subsets]]" in o.toml}
    assert set(general) == dataset.LOADER_KEYS
    assert "image_dir" not in defaults and "flip_prob" not in defaults  # [general] flip_prob: the loader's

    def subset_values(subset: fastdiff.Subset, want: dict[str, Any]) -> None:
        for name, value in want.items():
            path = options.SUBSET[name].kind == "path"
            assert getattr(subset, name) == (str(Path.cwd() / value) if path else value), name

    config = {"general": {**general, **defaults}, "datasets": [{"subsets": [{"image_dir": "a"}]}]}
    kwargs, subsets = fastdiff.load_config(config)
    # The loader's keys go to the loader (paths relative to the config), the others are subset defaults.
    assert kwargs == {
        k: str(Path.cwd() / v) if options.LOADER[k].kind == "path" else v for k, v in general.items()
    }
    subset_values(subsets[0], defaults)
    kwargs, subsets = fastdiff.load_config({"datasets": [{"subsets": [per_subset]}]})
    assert kwargs == {}
    subset_values(subsets[0], per_subset)
    # Every kohya alias stands for its name.
    assert dataset.ALIASES == {
        "bucket_reso_steps": "bucket_step",
        "min_bucket_reso": "min_bucket_side",
        "max_bucket_reso": "max_bucket_side",
        "bucket_no_upscale": "no_upscale",
        "weight": "loss_weight",
        "alpha_mask": "mask_from_alpha",
    }
    for alias, name in dataset.ALIASES.items():
        o = options.LOADER.get(name) or options.SUBSET[name]
        config = {"general": {alias: other(o)}, "datasets": [{"subsets": [{"image_dir": "a"}]}]}
        kwargs, subsets = fastdiff.load_config(config)
        assert {**dataclasses.asdict(subsets[0]), **kwargs}[name] == other(o), alias


def test_scan_flags_are_the_schema_scan_options(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    scan.add_scan_arguments(parser)
    # Besides the loader options: what scan prints (--json, and the --quality group's own knobs).
    own = ("help", "json", "quality", "max_upscale", "tokenizer", "contact_sheet")
    assert {a.dest for a in parser._actions} >= set(own)
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in own}
    assert set(flags) == {o.name for o in LOADER_OPTIONS if o.scan}
    for name, action in flags.items():
        o = options.LOADER[name]
        assert action.option_strings == [o.flag] and action.default is None
        assert action.help is not None and action.help.startswith(o.doc.replace("``", "").rstrip("."))
    args = parser.parse_args([str(folder), "--max-bucket-side", "128", "--no-upscale", "--resolution", "64"])
    assert (args.max_bucket_side, args.no_upscale, args.batch_size) == (128, True, None)
    assert scan.run_scan(args) == 0
    assert "images found: 3  loaded: 3  skipped: 0" in capsys.readouterr().out  # headers only


def test_state_records_the_options_that_change_batches(folder: Path) -> None:
    # Saved states from before the schema must keep loading: these are the keys they hold (but
    # batch_size and world_size, which the state's segments record since elastic resume).
    loader = fastdiff.DataLoader(folder, resolution=64, num_threads=1)
    state = loader.state_dict()
    saved = state["options"]
    assert set(saved) == {
        "resolution",
        "bucket_step",
        "min_bucket_side",
        "max_bucket_side",
        "crop",
        "flip_prob",
        "shuffle",
        "seed",
        "drop_last",
        "dtype",
        "caption_extensions",
        "background",
        "filter",
        "max_pixels",
        "remainder",
        "subsets",
    }
    assert saved["dtype"] == "float32" and saved["background"] == [255, 255, 255]
    assert saved["caption_extensions"] == [".txt", ".caption"]
    assert state["segments"] == [{"batch_size": 1, "world_size": 1, "batches": 0}]
    # A state of before: the geometry in its options, no segments.
    old = {k: v for k, v in state.items() if k != "segments"}
    loader.load_state_dict({**old, "options": {**saved, "batch_size": 1, "world_size": 1}})
    always = {o.name for o in SUBSET_OPTIONS if o.state == "always"}
    assert set(saved["subsets"][0]) == always - {"image_dir", "metadata_file"}
    assert {o.name for o in SUBSET_OPTIONS if o.state == "unless_default"} == {
        "class_tokens",
        "caption_prefix",
        "caption_suffix",
        "keep_tokens_separator",
        "secondary_separator",
        "enable_wildcard",
        "caption_dropout_every_n_epochs",
    }  # newer options: recorded only when set
    upscale = fastdiff.DataLoader(folder, resolution=64, no_upscale=True).state_dict()["options"]
    assert upscale["no_upscale"] is True  # a newer option: recorded only when set
    with pytest.raises(ValueError, match="no_upscale"):
        loader.load_state_dict(fastdiff.DataLoader(folder, resolution=64, no_upscale=True).state_dict())


def test_typed_dicts_have_the_keys_of_what_is_handed_out(folder: Path) -> None:
    loader = fastdiff.DataLoader(folder, resolution=64, batch_size=2, num_threads=1)
    batch, *_ = list(loader)  # the whole epoch, so that the broken file is met and reported
    assert set(batch) == set(types.Batch.__required_keys__) | {"pixel_values"}
    report = loader.report
    assert set(report) == set(types.Report.__annotations__)
    assert set(report["skipped"][0]) == set(types.SkippedFile.__annotations__)
    assert set(report["subsets"][0]) == set(types.SubsetReport.__annotations__)
    stats = loader.stats()
    assert stats is not None and set(stats) == set(types.LoadStats.__annotations__)
    assert options.LOADER["crop"].allowed == typing.get_args(types.Crop)
    assert batch["pixel_values"].dtype == torch.float32


def imports_of(module: Path, *, module_level: bool = False) -> set[str]:
    """The fastdiff modules ``module`` imports (at any depth of its code), by short name; with
    ``module_level``, only those outside its functions (what importing it runs)."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, functions) for n in ast.walk(f)}
    names = set()
    for node in ast.walk(tree):
        if module_level and id(node) in inside:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "fastdiff":
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastdiff."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fastdiff.")}
    return names


def test_the_loader_modules_import_one_way() -> None:
    # Bottom to top; each may import only modules before it (and the native module). The loader
    # also calls the cache builder (on_miss="encode"), importing it inside that function only.
    layers = ["types", "option", "kohya", "subset_options", "options", "docs", "remote", "parquet"]
    layers += ["sources", "dataset", "transfer", "loader", "group", "quality", "scan"]
    called = {"loader": {"cache"}}
    for i, name in enumerate(layers):
        allowed = {*layers[:i], "_fastdiff"}
        assert imports_of(PACKAGE / f"{name}.py") <= allowed | called.get(name, set()), name
        assert imports_of(PACKAGE / f"{name}.py", module_level=True) <= allowed, name
    assert imports_of(PACKAGE / "types.py") == set()
    assert imports_of(PACKAGE / "option.py") == set()
