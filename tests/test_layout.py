"""The package's shape, checked from its source: imports run one way and files stay small.

Every ``import``/``from`` of a ``fastdiff`` module counts, at any depth (inside functions and
``if TYPE_CHECKING:`` blocks too): a lower layer that names an application type depends on it as much as
one that imports it at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "fastdiff"
#: No source file of the package is longer than this many lines (issue 10: one job per file).
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The ``fastdiff`` modules that ``path`` imports (a name imported from a package counts as the
    submodule when one of that name exists, else as the package)."""
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target not in modules:
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            found.update(subs or {target})
    found.discard(this)
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over every ``.py`` file of ``python/fastdiff``."""
    files = sorted(PACKAGE.rglob("*.py"))
    # Native modules count by their stubs (``from fastdiff import _fastdiff`` names the extension).
    modules = {_module_name(f) for f in [*files, *PACKAGE.rglob("*.pyi")]}
    return {_module_name(f): _imports(f, modules) for f in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One example path for each strongly connected group of modules larger than one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_is_read_from_the_source() -> None:
    graph = import_graph()
    assert "fastdiff.loader" in graph
    assert "fastdiff.dataset" in graph["fastdiff.loader"]


def test_python_fastdiff_has_no_import_circles() -> None:
    assert _cycles(import_graph()) == []


def test_no_source_file_is_over_the_line_limit() -> None:
    repo = PACKAGE.parent.parent
    sources = [
        *PACKAGE.rglob("*.py"),
        *(repo / "rust").glob("*/src/**/*.rs"),  # unit tests included: they sit beside their code
        *(repo / "scripts").glob("*.py"),
        *(repo / "benches").glob("*.py"),
    ]
    assert len(sources) > 40
    sizes = {str(p.relative_to(repo)): len(p.read_text(encoding="utf-8").splitlines()) for p in sources}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
