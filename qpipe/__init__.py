"""qpipe: integer-only zero-shot INT8 quantization of speech recognition models.

The repository keeps one folder per layer (``ir/``, ``frontends/``, ``passes/``,
``backends/``); an installed qpipe maps them to ``qpipe.<folder>`` through
``[tool.setuptools.package-dir]``. Run from a checkout (``tools/qpipe``, tests
without installing), the same names resolve because this package also searches
the repository root for its sub-packages.
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

_repo_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_repo_root, "ir", "__init__.py")) and not _os.path.isdir(
    _os.path.join(_os.path.dirname(__file__), "ir")
):
    __path__.append(_repo_root)  # type: ignore[name-defined]  # noqa: F821

__all__ = ["__version__"]
