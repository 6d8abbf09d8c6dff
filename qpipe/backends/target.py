"""The target protocol and its registry.

A target is what ``qpipe MODEL -o OUT --target NAME`` writes and what
``qpipe transcribe|eval|inspect OUT`` runs: one small class with

    name, summary     how ``--target`` and ``--list-targets`` spell and describe it
    files             the model files it writes (the folder opener checks they exist)
    available()       (True, "") or (False, "one line: what is missing here")
    write(folder, gm, record, example)   its model files, into a folder being written
    load(folder, meta) -> Runner          those files back: float features -> integer logits

Everything else in an output folder (the atomic write, ``qpipe.json``, ``ir.txt``,
``report.txt``, ``frontend.pt``, opening a folder) is target-independent and
lives once in :mod:`qpipe.backends.folder`.

Adding a target is one module in ``qpipe/backends/`` whose class is registered
with ``@register_target`` (instantiated with no arguments; or
``register_target(instance)``). Every module there except this one, ``folder``
and private ``_*`` helpers is a target module, imported the first time the
registry is asked (``get_target``, ``list_targets``); a third-party package
registers its targets from an entry point in the group ``qpipe.targets``. A
target module must import without its runtime (onnxruntime, TensorRT, a GPU):
``available()`` says what is missing. A name is registered once: a second
target of the same name is an error.
"""
from __future__ import annotations

import difflib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, TypeVar, Union, runtime_checkable

import torch
from torch.fx import GraphModule

from qpipe.ir.errors import QpipeError


@dataclass
class SaveRecord:
    """What the pipeline knows about the model, for ``qpipe.json`` and for a target's ``write``.

    ``time_dim``: the input's dynamic time axis (None: none); ``time_multiple``: what a
    time length must be a multiple of; ``featurizer_state``: the float mel front end
    (written as ``frontend.pt``); ``extra``: more top-level keys for ``qpipe.json``.
    """

    pipeline: str
    passes: list[dict[str, Any]]
    source: str
    kind: str
    preprocessor: Optional[dict[str, Any]]
    vocabulary: Optional[list[str]]
    time_dim: Optional[int]
    time_multiple: int
    input_shape: list[int]
    featurizer_state: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Runner(Protocol):
    """A loaded target: float features (B, F, T) -> integer logits (B, T', V).

    The caller has already cut T to a multiple of the model's ``time_multiple``;
    the logits times the folder's output scale are the model's log-probabilities.
    """

    def logits_int(self, features: torch.Tensor) -> torch.Tensor: ...


class Target(ABC):
    """One way to emit and run the integer graph (see the module docstring)."""

    name: str = ""
    summary: str = ""
    files: tuple[str, ...] = ()
    # pass options this target needs where the pipeline does not set them itself
    # ({"insert-observers": {"unsigned_relu": False}}: a runtime without uint8)
    pass_defaults: dict[str, dict[str, Any]] = {}

    def available(self) -> tuple[bool, str]:
        """``(True, "")``, or ``(False, reason)`` with one line saying what is missing here."""
        return True, ""

    @abstractmethod
    def write(self, folder: str, gm: GraphModule, record: SaveRecord, example: torch.Tensor) -> None:
        """Write this target's model files for the integer graph ``gm`` into ``folder``.

        ``example`` is an input of the float model's shape; raise QpipeError with one
        line when the graph cannot be emitted. Must not change ``gm``'s numbers.
        """

    @abstractmethod
    def load(self, folder: str, meta: dict[str, Any]) -> Runner:
        """The files ``write`` wrote, loaded; ``meta`` is the folder's ``qpipe.json``."""


_TARGETS: dict[str, Target] = {}
_NOT_TARGET_MODULES = {"target", "folder"}
_loaded = False

T = TypeVar("T", bound=Union[Target, type])


def register_target(target: T) -> T:
    """Register a target (an instance, or a class to instantiate with no arguments).

    Usable as a class decorator; returns its argument.
    """
    instance = target() if isinstance(target, type) else target
    if not isinstance(instance, Target):
        raise QpipeError(f"register_target: {target!r} is not a qpipe.backends.Target")
    name = instance.name
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise QpipeError(f"target names are lower-case words joined by '-', got {name!r}")
    if name in _TARGETS:
        where = type(_TARGETS[name]).__module__
        raise QpipeError(f"target '{name}' is already registered (by {where}); pick another name")
    _TARGETS[name] = instance
    return target


def _load_targets() -> None:
    """Import the built-in target modules (qpipe/backends/*.py) and the ``qpipe.targets`` entry points, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import os
    import pkgutil
    from importlib.metadata import entry_points

    package = __name__.rpartition(".")[0]  # qpipe.backends, by path (importing it here would be a cycle)
    for info in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]):
        if not info.name.startswith("_") and info.name not in _NOT_TARGET_MODULES:
            importlib.import_module(f"{package}.{info.name}")
    for ep in entry_points(group="qpipe.targets"):
        ep.load()


def get_target(name: str) -> Target:
    _load_targets()
    if name not in _TARGETS:
        close = difflib.get_close_matches(str(name), list(_TARGETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (targets: {', '.join(sorted(_TARGETS)) or 'none'})"
        raise QpipeError(f"unknown target '{name}'{hint}; see --list-targets")
    return _TARGETS[name]


def list_targets() -> list[Target]:
    _load_targets()
    return [_TARGETS[k] for k in sorted(_TARGETS)]


def check_available(target: Target) -> None:
    """Raise one QpipeError line when ``target`` cannot run here."""
    ok, why = target.available()
    if not ok:
        raise QpipeError(f"target '{target.name}' is not available here: {why or 'no reason given'}")
