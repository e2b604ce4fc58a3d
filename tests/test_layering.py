"""The rooms of tierlift import one way (docs/architecture.md), checked from the source.

Every module of ``tierlift/`` is parsed with ``ast`` (nothing is imported) and each of
its imports is sorted into one of three kinds:

- *module-level*: runs when the module is imported.  It must point to the same room or
  to a room on a lower floor;
- *function-level*: runs later, inside a function.  An import of a tierlift module
  there is how a cycle or a back-edge gets hidden, so it is allowed only in the rooms
  whose start-up must stay light (``launch`` and the package face); third-party
  imports there are fine anywhere (optional dependencies, start-up time);
- *type-only* (under ``if TYPE_CHECKING:``): never runs, so it cannot close a cycle,
  but it still names the other room's types: it must point the same way.

The imports that run (module- and function-level) must form no cycle between modules.

Like Ray's ``test_circular_imports.py``, but for direction.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Floors, ground first.  A module may import its own room and any room on a lower
# floor; two rooms on one floor know nothing of each other.  The first matching
# prefix names a module's room (longest prefixes are tried first).
FLOORS: list[dict[str, tuple[str, ...]]] = [
    # base: error types, strict config loading, the chunk layout every room reads,
    # the checkpoint contract types the engine and the host optimizer hand out.
    {"base": ("tierlift.errors", "tierlift._configbase", "tierlift.layout", "tierlift.state")},
    # models: plain nn.Modules; they know nothing of how they are trained.
    {"models": ("tierlift.models",)},
    # offload: memory and storage tiers, the optimizer step, the host optimizer.
    {"offload": ("tierlift.offload",)},
    # parallel: the ZeRO engine and collectives (drives offload); system: node probing,
    # telemetry, calibration (measures offload's own NVMe and pinned paths).
    {"parallel": ("tierlift.parallel",), "system": ("tierlift.system",)},
    # runtime: config, planner, policy, Trainer, checkpoints, data.
    {"runtime": ("tierlift.runtime",)},
    # launch: the CLI and the launchers that start ranks.
    {"launch": ("tierlift.launch",)},
    # the package face: `import tierlift`, `python -m tierlift`.
    {"face": ("tierlift.__init__", "tierlift.__main__")},
]
# Rooms whose function-level imports of tierlift modules are start-up laziness, not
# a hidden edge: the CLI imports a command's code only when that command runs, and
# `import tierlift` must not import torch.
LAZY_ROOMS = {"launch", "face"}


@dataclass(frozen=True)
class Edge:
    src: str      # importing module, dotted
    dst: str      # imported module, dotted
    path: str     # importing file, relative to the root
    line: int
    kind: str     # "module" | "function" | "type"


def _floor_of(floors) -> dict[str, tuple[int, str]]:
    """prefix -> (floor, room)."""
    return {p: (i, room) for i, floor in enumerate(floors) for room, ps in floor.items() for p in ps}


def room_of(module: str, floors=FLOORS) -> tuple[int, str] | None:
    prefixes = _floor_of(floors)
    for p in sorted(prefixes, key=len, reverse=True):
        if module == p or module.startswith(p + "."):
            return prefixes[p]
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts)  # a package's __init__ keeps its name: tierlift.models.__init__


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, kind) for every import statement, walking scopes so that each import
    knows whether it runs at import time, inside a function, or never."""
    def walk(node, kind):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, kind
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, "type" if kind == "type" else "function")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), "type")
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), kind)
            else:
                yield from walk(child, kind)
    yield from walk(tree, "module")


def collect_edges(root: Path, package: str) -> tuple[set[str], list[Edge]]:
    """Every module under ``root/package`` and every import of one of them by another."""
    files = sorted((root / package).rglob("*.py"))
    modules = {_module_name(f, root) for f in files}

    def resolve(name: str) -> str | None:
        # `tierlift.runtime` means the package's __init__; `tierlift.runtime.x.Y` the module x.
        while name:
            if name in modules:
                return name
            if name + ".__init__" in modules:
                return name + ".__init__"
            name = name.rpartition(".")[0]
        return None

    edges = []
    for f in files:
        src = _module_name(f, root)
        pkg = src.rpartition(".")[0] if not src.endswith(".__init__") else src[: -len(".__init__")]
        tree = ast.parse(f.read_text(), filename=str(f))
        for node, kind in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from . import x / from ..a import b
                    anchor = pkg.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one.
                targets = [f"{base}.{a.name}" if resolve(f"{base}.{a.name}") not in (None, resolve(base))
                           else base for a in node.names]
            for t in targets:
                if not (t == package or t.startswith(package + ".")):
                    continue
                dst = resolve(t)
                if dst is not None and dst != src:
                    edges.append(Edge(src, dst, str(f.relative_to(root)), node.lineno, kind))
    return modules, list(dict.fromkeys(edges))  # `from m import a, b` is one import of m


def check(root: Path, package: str, floors=FLOORS, lazy_rooms=LAZY_ROOMS) -> list[str]:
    """One line per breach: ``file:line: what``, empty when the rooms import one way."""
    modules, edges = collect_edges(root, package)
    problems = []
    for m in sorted(modules):
        if room_of(m, floors) is None:
            problems.append(f"{m.replace('.', '/')}.py: module {m} has no room; add it to FLOORS in "
                            f"tests/test_layering.py and to docs/architecture.md")
    for e in edges:
        src_room, dst_room = room_of(e.src, floors), room_of(e.dst, floors)
        if src_room is None or dst_room is None:
            continue
        (sf, sr), (df, dr) = src_room, dst_room
        arrow = f"{sr} -> {dr} ({e.src} imports {e.dst})"
        if sr != dr and df >= sf:
            where = "a higher floor" if df > sf else "a room on the same floor"
            problems.append(f"{e.path}:{e.line}: {arrow}: imports {where}; move what both need below them")
        if e.kind == "function" and sr not in lazy_rooms:
            problems.append(f"{e.path}:{e.line}: {arrow}: function-level import of a tierlift module; "
                            f"import it at the top of the module")
    graph = nx.DiGraph()
    for e in edges:
        if e.kind != "type":  # a function-level import closes a cycle too, only later
            graph.add_edge(e.src, e.dst, at=f"{e.path}:{e.line}")
    for scc in nx.strongly_connected_components(graph):
        if len(scc) > 1:
            cycle = nx.find_cycle(graph.subgraph(scc))
            problems.append("import cycle: " + ", ".join(
                f"{graph.edges[a, b]['at']}: {a} -> {b}" for a, b in cycle))
    return problems


# ----------------------------------------------------------------------------- the house


def test_rooms_import_one_way():
    problems = check(ROOT, "tierlift")
    assert not problems, "\n" + "\n".join(problems)


def test_every_room_is_on_a_floor_once():
    rooms = [room for floor in FLOORS for room in floor]
    prefixes = [p for floor in FLOORS for ps in floor.values() for p in ps]
    assert len(rooms) == len(set(rooms)) and len(prefixes) == len(set(prefixes))
    assert {p.split(".")[1] for p in prefixes if p.count(".") == 1 and not p.endswith("__")} >= {
        d.name for d in (ROOT / "tierlift").iterdir() if d.is_dir() and (d / "__init__.py").exists()}


# ----------------------------------------------------------------------------- the checker


TOY_FLOORS = [{"base": ("toy.base",)}, {"low": ("toy.low",)}, {"high": ("toy.high",), "side": ("toy.side",)},
              {"top": ("toy.top", "toy.__init__")}]


def _toy(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"toy/__init__.py": "", "toy/low/__init__.py": "", "toy/high/__init__.py": "",
                      "toy/side/__init__.py": "", "toy/top/__init__.py": "", **files}.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return tmp_path


CLEAN = {
    "toy/base.py": "X = 1\n",
    "toy/low/a.py": "from toy.base import X\n",
    "toy/high/b.py": "from toy.low import a\nfrom toy.low.a import X\nimport toy.base\n",
    "toy/side/c.py": "from toy.low.a import X\n",
    "toy/top/d.py": "from toy.high.b import X\n\ndef main():\n    from toy.side import c\n    import json\n",
    "toy/low/opt.py": "def f():\n    import yaml  # optional third-party: fine\n",
}


def test_checker_passes_a_clean_house(tmp_path):
    assert check(_toy(tmp_path, CLEAN), "toy", TOY_FLOORS, {"top"}) == []


@pytest.mark.parametrize("name, files, expected", [
    ("back-edge", {"toy/low/a.py": "from toy.base import X\nfrom toy.high.b import Y\n"},
     "toy/low/a.py:2: low -> high (toy.low.a imports toy.high.b): imports a higher floor"),
    ("back-edge through a package", {"toy/low/a.py": "import os\nfrom toy import high\n"},
     "toy/low/a.py:2: low -> high (toy.low.a imports toy.high.__init__): imports a higher floor"),
    ("relative back-edge", {"toy/low/a.py": "from ..high import b\n"},
     "toy/low/a.py:1: low -> high (toy.low.a imports toy.high.b): imports a higher floor"),
    ("same floor", {"toy/side/c.py": "from toy.high.b import X\n"},
     "toy/side/c.py:1: side -> high (toy.side.c imports toy.high.b): imports a room on the same floor"),
    ("type-only back-edge", {"toy/low/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                             "    from toy.high.b import Y\n"},
     "toy/low/a.py:3: low -> high (toy.low.a imports toy.high.b): imports a higher floor"),
    ("hidden in a function", {"toy/high/b.py": "def f():\n    from toy.low.a import X\n"},
     "toy/high/b.py:2: high -> low (toy.high.b imports toy.low.a): function-level import of a tierlift module"),
    ("cycle", {"toy/low/a.py": "from toy.low import e\n", "toy/low/e.py": "import toy.low.a\n"},
     "import cycle: "),
    ("no room", {"toy/attic.py": "X = 2\n"}, "toy/attic.py: module toy.attic has no room"),
])
def test_checker_catches(tmp_path, name, files, expected):
    problems = check(_toy(tmp_path, {**CLEAN, **files}), "toy", TOY_FLOORS, {"top"})
    assert any(p.startswith(expected) for p in problems), (name, problems)


def test_cycle_names_both_files_and_lines(tmp_path):
    problems = check(_toy(tmp_path, {**CLEAN, "toy/low/a.py": "import os\nfrom toy.low import e\n",
                                     "toy/low/e.py": "import toy.low.a\n"}), "toy", TOY_FLOORS, {"top"})
    (cycle,) = [p for p in problems if p.startswith("import cycle")]
    assert "toy/low/a.py:2: toy.low.a -> toy.low.e" in cycle and "toy/low/e.py:1: toy.low.e -> toy.low.a" in cycle


def test_type_only_import_closes_no_cycle(tmp_path):
    problems = check(_toy(tmp_path, {**CLEAN, "toy/low/a.py": "from toy.low import e\n",
                                     "toy/low/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                     "    from toy.low.a import Z\n"}), "toy", TOY_FLOORS, {"top"})
    assert problems == []


if __name__ == "__main__":  # a readable list while fixing: python tests/test_layering.py
    print("\n".join(check(ROOT, "tierlift")) or "the rooms import one way")
    sys.exit(0)
