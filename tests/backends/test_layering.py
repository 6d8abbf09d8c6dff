"""The layering rule for backends/ and asr/ (DESIGN.md, "Layers"), read from the source.

backends/ may import qpipe.ir and qpipe.frontends, never qpipe.passes, qpipe.asr or
the application (qpipe.api, qpipe.cli, qpipe.inspect); asr/ may import backends,
frontends and ir, never the application. Function-level imports count too.
(tests/test_layers.py checks the whole product's layer order and cycles.)
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

PKG = os.path.join(ROOT, "qpipe")
APP = ("qpipe.api", "qpipe.cli", "qpipe.inspect")
FORBIDDEN = {
    "backends": ("qpipe.passes", "qpipe.asr") + APP,
    "asr": APP + ("qpipe.passes",),
}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out: set[str] = set()
    me = _module_name(path)
    package = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from qpipe import api`
    return {m for m in out if m == "qpipe" or m.startswith("qpipe.")}


def _files(folder: str) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(os.path.join(PKG, folder)):
        found += [os.path.join(dirpath, n) for n in names if n.endswith(".py")]
    return sorted(found)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(folder):
    files = _files(folder)
    assert files
    bad = []
    for path in files:
        for mod in sorted(_imports(path)):
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[folder]):
                bad.append(f"{os.path.relpath(path, ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["qpipe.backends", "qpipe.backends.folder", "qpipe.backends.reference", "qpipe.asr.evaluate"])
def test_imports_alone_in_a_fresh_interpreter(module):
    """Each imports first in a fresh interpreter (no cycle at run time), and neither it nor
    every target module (imported by list_targets) pulls in a layer above it."""
    layer = module.split(".")[1]
    code = f"import sys, {module}, qpipe.backends; qpipe.backends.list_targets(); print(sorted(m for m in sys.modules if m.startswith({FORBIDDEN[layer]!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
