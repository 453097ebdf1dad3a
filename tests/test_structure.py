"""Package-wide rules of the layout (DESIGN.md, "Layout"), checked from the source with
:mod:`ast` (nothing is imported):

- no import cycle among difftune's modules, counting every import anywhere in a module
  (module level, inside functions, under ``if TYPE_CHECKING:``);
- modules under ``search/``, ``trainables/`` and ``benchmarks/`` stay under 400 lines;
- a folder of ``search/`` or ``trainables/`` holds at most 12 modules directly (its
  ``__init__.py`` not counted);
- nothing under ``trainables/`` imports ``difftune.search``;
- among ``trainables/``, only ``trainables/trainable.py`` imports Ray;
- ``benchmarks/`` run as modules (``python -m benchmarks.NAME``) and never edit ``sys.path``.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # the repository root: the package `difftune`
PACKAGE = "difftune"
#: folders at the top of the repository that are not part of the package
NOT_PACKAGE = frozenset({"tests", "benchmarks", "cluster"})
MAX_LINES = 400
MAX_MODULES = 12


# ----------------------------------------------------------------------------- the graph


def module_files(root: Path, package: str = PACKAGE, skip: Iterable[str] = NOT_PACKAGE
                 ) -> dict[str, Path]:
    """Dotted module name -> source file of every module of the package rooted at ``root``
    (a package's name maps to its ``__init__.py``). Top-level folders in ``skip``, hidden
    folders and folders without an ``__init__.py`` are not part of it."""
    skip = set(skip)
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in skip or any(p.startswith((".", "__pycache__")) for p in rel.parts):
            continue
        if not all((root.joinpath(*rel.parts[:i]) / "__init__.py").is_file()
                   for i in range(len(rel.parts))):
            continue  # a folder that is not a package (and what is below it)
        parts = [package, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: Mapping[str, Path]) -> bool:
    return name in files and files[name].name == "__init__.py"


def _resolve_from(module: str, node: ast.ImportFrom, files: Mapping[str, Path]) -> str:
    """The absolute name of ``from <node.module> import ...`` in ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, files):  # relative to the module's own package
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, files: Mapping[str, Path]) -> str | None:
    """``name``, or its longest prefix that is a module of ``files``; None outside them."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in files:
            return ".".join(parts[:i])
    return None


def imports_of(module: str, source: str, files: Mapping[str, Path]) -> set[str]:
    """The modules of ``files`` that ``module`` imports, anywhere in its source.

    ``import a.b`` is an edge to ``a.b`` (a package: its ``__init__``); ``from a.b import c``
    is an edge to ``a.b.c`` when that is a module, else to ``a.b``. A name outside ``files``
    (another distribution) is no edge, nor is a module importing itself."""
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, files) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node, files)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in files else _known(base, files))
    found.discard(None)
    found.discard(module)
    return found  # type: ignore[return-value]


def import_graph(root: Path, package: str = PACKAGE, skip: Iterable[str] = NOT_PACKAGE
                 ) -> dict[str, set[str]]:
    """module -> the package's modules it imports."""
    files = module_files(root, package, skip)
    return {m: imports_of(m, p.read_text(encoding="utf-8"), files) for m, p in files.items()}


def tangles(graph: Mapping[str, set[str]]) -> list[set[str]]:
    """The strongly connected components (Tarjan's algorithm) that hold a cycle: more than
    one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # iterative, so a deep graph does not hit the recursion limit
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [set(c) for c in components if len(c) > 1 or c[0] in graph.get(c[0], ())]


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (``[a, b, ..., a]``) through the first module of each of the
    graph's :func:`tangles`; sorted."""
    return sorted(_a_cycle(graph, min(t), t) for t in tangles(graph))


def _a_cycle(graph: Mapping[str, set[str]], start: str, members: set[str]) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``members`` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]  # [start, ..., v, start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def _format(cycle: list[str]) -> str:
    return " -> ".join(cycle)


# ----------------------------------------------------------------------------- self-checks


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_graph_finds_a_cycle_through_a_function_import_and_type_checking(tmp_path: Path):
    _write(tmp_path, {
        "__init__.py": "",
        "a/__init__.py": "",
        "a/one.py": "def f():\n    from difftune.a import two\n",
        "a/two.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from .three import X\n"),
        "a/three.py": "from ..a.one import f\nimport os\n",
        "b/__init__.py": "from difftune.a.one import f\n",
        "tests/test_x.py": "import difftune.b\n",
    })
    graph = import_graph(tmp_path)
    assert "difftune.tests.test_x" not in graph  # tests are not part of the package
    assert graph["difftune.a.one"] == {"difftune.a.two"}
    assert graph["difftune.a.two"] == {"difftune.a.three"}
    assert graph["difftune.a.three"] == {"difftune.a.one"}  # `import os`: no edge
    assert graph["difftune.b"] == {"difftune.a.one"}
    assert find_cycles(graph) == [["difftune.a.one", "difftune.a.two", "difftune.a.three",
                                   "difftune.a.one"]]


def test_graph_resolves_packages_and_finds_no_cycle_where_there_is_none(tmp_path: Path):
    _write(tmp_path, {
        "__init__.py": "from difftune.a import util\n",
        "a/__init__.py": "",
        "a/util.py": "import json\n",
        "a/user.py": "from . import util\nfrom .util import x\nimport difftune.a.util as u\n",
        "a/pkg_user.py": "import difftune.a\nfrom difftune.a import not_a_module\n",
        "notpkg/mod.py": "import difftune.a.user\n",  # no __init__: not a module of it
    })
    graph = import_graph(tmp_path)
    assert graph["difftune"] == {"difftune.a.util"}
    assert graph["difftune.a.user"] == {"difftune.a.util"}
    assert graph["difftune.a.pkg_user"] == {"difftune.a"}  # a package: its __init__
    assert "difftune.notpkg.mod" not in graph
    assert find_cycles(graph) == []
    graph["difftune.a.util"].add("difftune.a.user")
    assert find_cycles(graph) == [["difftune.a.user", "difftune.a.util", "difftune.a.user"]]


# ----------------------------------------------------------------------------- the rules

GRAPH = import_graph(ROOT)


def test_the_graph_covers_the_package():
    assert {"difftune", "difftune.search", "difftune.trainables",
            "difftune.trainables.cache.feature_cache"} <= set(GRAPH)
    assert not any(m.startswith(tuple(f"{PACKAGE}.{d}" for d in NOT_PACKAGE)) for m in GRAPH)


def test_no_import_cycle():
    found = sorted(tangles(GRAPH), key=min)
    assert not found, "import cycles (imports inside functions count), one per tangle:\n" + \
        "\n".join(f"{_format(_a_cycle(GRAPH, min(t), t))}   [tangle of {len(t)}: "
                  f"{', '.join(sorted(t))}]" for t in found)


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for d in folders for p in (ROOT / d).rglob("*.py")
                  if "__pycache__" not in p.parts)


@pytest.mark.parametrize("folder", ["search", "trainables", "benchmarks"])
def test_modules_are_under_400_lines(folder: str):
    long = {str(p.relative_to(ROOT)): n for p in _python_files(folder)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("folder", ["search", "trainables"])
def test_folders_hold_at_most_12_modules(folder: str):
    crowded = {}
    for d in [ROOT / folder, *sorted(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
        modules = [p for p in d.glob("*.py") if p.name != "__init__.py"]
        if len(modules) > MAX_MODULES:
            crowded[str(d.relative_to(ROOT))] = len(modules)
    assert not crowded, f"folders with more than {MAX_MODULES} modules: {crowded}"


def _trainables() -> dict[str, Path]:
    return {m: p for m, p in module_files(ROOT).items()
            if m == f"{PACKAGE}.trainables" or m.startswith(f"{PACKAGE}.trainables.")}


def test_trainables_never_import_search():
    bad = {m: sorted(i for i in GRAPH[m] if i == f"{PACKAGE}.search"
                     or i.startswith(f"{PACKAGE}.search."))
           for m in _trainables()}
    bad = {m: i for m, i in bad.items() if i}
    assert not bad, f"trainables importing difftune.search: {bad}"


def _imported_names(source: str) -> set[str]:
    """Every absolute module name imported anywhere in ``source``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_only_the_trainable_module_imports_ray():
    allowed = f"{PACKAGE}.trainables.trainable"
    bad = sorted(m for m, p in _trainables().items() if m != allowed and any(
        n == "ray" or n.startswith("ray.") for n in _imported_names(p.read_text("utf-8"))))
    assert not bad, f"trainables importing ray (only {allowed} may): {bad}"


def test_the_ray_rule_sees_an_import_inside_a_function():
    assert "ray.tune" in _imported_names("def f():\n    if True:\n        import ray.tune\n")


def _edits_sys_path(source: str) -> bool:
    """Whether ``source`` calls a method of ``sys.path`` or assigns to it."""
    def is_sys_path(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path"
                and isinstance(node.value, ast.Name) and node.value.id == "sys")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and is_sys_path(node.func.value):
            return True
        if isinstance(node, (ast.Assign, ast.AugAssign)) and any(
                is_sys_path(t) for t in getattr(node, "targets", [getattr(node, "target", None)])):
            return True
    return False


def test_benchmarks_are_a_package_that_never_edits_sys_path():
    assert (ROOT / "benchmarks" / "__init__.py").is_file()
    bad = [p.name for p in _python_files("benchmarks") if _edits_sys_path(p.read_text("utf-8"))]
    assert not bad, f"benchmarks editing sys.path (run them as python -m benchmarks.NAME): {bad}"
    assert _edits_sys_path("import sys\nsys.path.insert(0, 'x')\n")
    assert _edits_sys_path("import sys\nsys.path += ['x']\n")
    assert not _edits_sys_path("import sys\nprint(sys.path[0])\n")


#: the folders of search/, each importing only folders after it (docs/layout.md)
SEARCH_LAYERS = ("cli", "run", "report", "records", "plan", "space")


def test_search_folders_depend_one_way():
    """A folder of search/ imports only the folders to its right in :data:`SEARCH_LAYERS`
    (and modules directly under search/ or in trainables/)."""
    rank = {name: i for i, name in enumerate(SEARCH_LAYERS)}
    back = []
    for module, targets in GRAPH.items():
        parts = module.split(".")
        if parts[:2] != ["difftune", "search"] or len(parts) < 4:
            continue
        for target in targets:
            tparts = target.split(".")
            if tparts[:2] != ["difftune", "search"] or len(tparts) < 4 or tparts[2] == parts[2]:
                continue
            if rank[tparts[2]] <= rank[parts[2]]:
                back.append(f"{module} -> {target}")
    assert set(rank) == {p.parent.name for p in (ROOT / "search").glob("*/__init__.py")}
    assert not back, "imports against the layers " + " > ".join(SEARCH_LAYERS) + ":\n" + \
        "\n".join(sorted(back))
