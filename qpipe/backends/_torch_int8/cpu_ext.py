"""The C++ CPU kernels (``cpu_kernels.cpp``), built once with
``torch.utils.cpp_extension.load`` and cached by torch (``TORCH_EXTENSIONS_DIR``).

Built only where a C++ compiler is present; :func:`get` returns ``None`` (and
:func:`why_not` says why) otherwise, and the target falls back to pure-torch
kernels that compute the same integers. The build is named by a hash of the
source, the flags and this CPU's model, so a changed source or another CPU
(``-march=native``) never loads a stale binary.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import time
from typing import Any, Optional

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cpp")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
_lock = threading.Lock()
_state: dict[str, Any] = {}


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags") or line.startswith("model name"):
                    _state.setdefault("_cpu", []).append(line.strip())
        return "\n".join(_state.pop("_cpu", []))
    except OSError:
        return platform.processor()


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


# A build takes about a minute here; a lock older than this was left by a killed build.
_STALE_LOCK_S = 15 * 60


def _clear_stale_lock(cpp_extension: Any, name: str) -> None:
    """torch's builder waits forever on the lock file of a build that was killed mid-way, so every later
    ``load`` of the model would hang; a lock far older than any build is removed first."""
    try:
        lock = os.path.join(cpp_extension._get_build_directory(name, False), "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > _STALE_LOCK_S:
            os.remove(lock)
    except (OSError, AttributeError):  # a torch without the private helper: leave the lock to torch
        pass


def get() -> Optional[Any]:
    """The compiled extension module, or None when it cannot be built here."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        mod, why = None, ""
        if os.environ.get("QPIPE_TORCH_INT8_NO_EXT"):
            why = "disabled by QPIPE_TORCH_INT8_NO_EXT"
        elif _compiler() is None:
            why = "no C++ compiler (c++/g++/clang++) on PATH"
        else:
            try:
                from torch.utils import cpp_extension

                with open(_SRC, "rb") as f:
                    src = f.read()
                tag = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_id().encode()).hexdigest()[:12]
                name = f"qpipe_torch_int8_{tag}"
                _clear_stale_lock(cpp_extension, name)
                mod = cpp_extension.load(
                    name=name,
                    sources=[_SRC],
                    extra_cflags=_FLAGS,
                    extra_ldflags=["-fopenmp"],
                    verbose=bool(os.environ.get("QPIPE_TORCH_INT8_VERBOSE")),
                )
            except Exception as exc:  # a failed build falls back, it never breaks loading a model
                mod, why = None, f"C++ kernels failed to build: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _state["module"], _state["why"] = mod, why
        return mod


def why_not() -> str:
    get()
    return _state.get("why", "")
