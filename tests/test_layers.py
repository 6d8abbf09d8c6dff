"""The product's import graph keeps its layers: ir < frontends < passes < backends < asr < app.

Every ``.py`` under ``qpipe/`` is parsed with :mod:`ast`; every import counts, at module
level, inside functions and under ``if TYPE_CHECKING:`` alike (a type-only import is still a
dependency, and static tools see its circles).  ``qpipe/__init__.py`` and a bare ``import
qpipe`` count as nothing.  An import names the module it names: ``from qpipe.ir import
passes`` is an edge to ``qpipe.ir.passes`` when that is a module, else to ``qpipe.ir`` (its
``__init__``); importing a submodule is not counted as importing its parent package.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qpipe"

LAYERS = ["qpipe.ir", "qpipe.frontends", "qpipe.passes", "qpipe.backends", "qpipe.asr", "app"]
RANK = {name: i for i, name in enumerate(LAYERS)}
FORBIDDEN_TOP = {"demo", "recipes"}


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # what the statement names, resolved to absolute
    line: int
    where: str  # "path:line"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py")) if "__pycache__" not in p.parts}


MODULES = _modules()


def _layer(module: str) -> str | None:
    """The layer of a product module; None for ``qpipe`` itself (its __init__ counts as nothing)."""
    if module == "qpipe":
        return None
    for layer in LAYERS[:-1]:
        if module == layer or module.startswith(layer + "."):
            return layer
    parts = module.split(".")
    if len(parts) == 2 and (PKG / f"{parts[1]}.py").is_file():
        return "app"  # a module directly in qpipe/
    return "unknown"


def _imports() -> list[Import]:
    out = []
    for module, path in MODULES.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    out.append(Import(module, alias.name, node.lineno, where))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = package[: len(package) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                for alias in node.names:
                    sub = f"{prefix}.{alias.name}"
                    out.append(Import(module, sub if sub in MODULES else prefix, node.lineno, where))
    return out


IMPORTS = _imports()


def _product_edges() -> dict[str, dict[str, str]]:
    """importer -> {imported product module: first place it is imported}, qpipe/__init__ left out."""
    edges: dict[str, dict[str, str]] = {m: {} for m in MODULES if m != "qpipe"}
    for imp in IMPORTS:
        if imp.importer == "qpipe" or imp.target == imp.importer:
            continue
        target = imp.target
        while target and target not in MODULES:  # `import qpipe.ir.passes.x` of a name: its module
            target = target.rpartition(".")[0]
        if target and target != "qpipe" and target != imp.importer:
            edges[imp.importer].setdefault(target, imp.where)
    return edges


EDGES = _product_edges()


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for comp in sccs:  # a shortest way round from the component's first module back to it
        members, start = set(comp), comp[0]
        paths, seen, found = [[start]], {start}, None
        while paths and found is None:
            nxt = []
            for path in paths:
                for w in sorted(edges[path[-1]]):
                    if w == start:
                        found = path + [start]
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        nxt.append(path + [w])
                if found:
                    break
            paths = nxt
        cycles.append(found or comp)
    return cycles


def _show_cycle(cycle: list[str]) -> str:
    return " -> ".join(
        f"{a} ({EDGES[a][b]})" for a, b in zip(cycle, cycle[1:])
    ) + f" -> {cycle[-1]}"


def test_the_parse_sees_the_product():
    # a guard on the test itself: it read the layers' modules and their imports
    layers = {_layer(m) for m in MODULES}
    assert set(LAYERS) <= layers, layers
    assert len(IMPORTS) > 50 and sum(len(v) for v in EDGES.values()) > 20


def test_every_product_module_is_in_a_layer():
    unknown = sorted(m for m in MODULES if _layer(m) == "unknown")
    assert not unknown, f"modules outside the layers {LAYERS}: {unknown}"


def test_no_import_cycle_among_product_modules():
    cycles = _cycles(EDGES)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(_show_cycle(c) for c in cycles)


def test_ir_imports_nothing_above_it():
    bad = sorted(
        f"{where}: {m} imports {t} ({_layer(t)})"
        for m, targets in EDGES.items() if _layer(m) == "qpipe.ir"
        for t, where in targets.items() if _layer(t) not in ("qpipe.ir", None)
    )
    assert not bad, f"{len(bad)} import(s) from qpipe.ir upwards:\n" + "\n".join(bad)


def test_layers_import_only_their_own_or_lower_layers():
    bad = sorted(
        f"{where}: {m} ({_layer(m)}) imports {t} ({_layer(t)})"
        for m, targets in EDGES.items() if _layer(m) in RANK
        for t, where in targets.items() if _layer(t) in RANK and RANK[_layer(t)] > RANK[_layer(m)]
    )
    assert not bad, f"{len(bad)} import(s) of a higher layer (order {' < '.join(LAYERS)}):\n" + "\n".join(bad)


def test_product_never_imports_the_demo_or_recipes():
    bad = sorted(f"{imp.where}: {imp.importer} imports {imp.target}"
                 for imp in IMPORTS if imp.target.split(".")[0] in FORBIDDEN_TOP)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("edges, expect", [
    ({"a": {"b": "x"}, "b": {"c": "y"}, "c": {"a": "z"}, "d": {"a": "w"}}, [["a", "b", "c", "a"]]),
    ({"a": {"b": "x"}, "b": {}}, []),
])
def test_cycle_finder_itself(edges, expect):
    assert _cycles(edges) == expect
