"""Pass infrastructure: registry by name, pipeline strings, named pipelines, runner.

A pass is a plain function ``(gm, ctx) -> PassResult`` registered with
``@register(name, needs=Stage.X, leaves=Stage.Y, options={...})``. Pipelines are
strings (``fold-bn,insert-observers{act=percentile:99.99},...``) so a run can be
written down and replayed. The runner checks the stages fit before running
anything, and after every pass owns the bookkeeping a pass would otherwise
repeat: lint, recompile, re-derive ``meta["val"]`` (when the pass says it changed
the graph), then verify (timed apart from the pass). It instruments like
LLVM/MLIR (print-after-all, print-after-change, diffs, numbered dumps).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch.fx import GraphModule

from qpipe.ir.errors import PassFailure, QpipeError
from qpipe.ir.printer import print_ir
from qpipe.ir.shapes import propagate_meta
from qpipe.ir.stages import Stage, graph_stage, set_graph_stage
from qpipe.ir.state import PipelineState
from qpipe.ir.verifier import verify


@dataclass
class PassResult:
    gm: GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may read besides the graph.

    ``options``: this pass's options (defaults filled in, types checked).
    ``state``: shared across the pipeline (:class:`PipelineState`: frontend facts
    such as the example input's shape, the calibration inputs, results a later
    pass needs).
    """

    options: dict[str, Any] = field(default_factory=dict)
    state: PipelineState = field(default_factory=PipelineState)
    pass_name: str = ""
    progress: bool = True
    log: Callable[[str], None] = lambda msg: None


PassFn = Callable[[GraphModule, PassContext], PassResult]


@dataclass(frozen=True)
class Opt:
    """One pass option: its default (which also fixes its type) and the values that make sense.

    Declared where the pass is registered (``options={"steps": Opt(50, lo=0)}``) so
    that ``parse_pipeline`` rejects a bad value when the command starts, before the
    model is loaded or any pass runs, in the same words for every pass. A plain
    default (``options={"steps": 50}``) is an ``Opt`` without limits.

    ``lo``/``hi``: inclusive bounds of a number (``lo_open``/``hi_open``: exclusive);
    ``choices``: the allowed values; ``check``: a function of the value that returns
    what is wrong with it as a phrase (or None), or raises a QpipeError worded in
    full, for what bounds cannot say (a range method such as ``percentile:99.99``,
    a file that must exist).
    """

    default: Any
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: Optional[tuple[Any, ...]] = None
    check: Optional[Callable[[Any], Optional[str]]] = None

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with ``value`` (one phrase), or None."""
        if self.choices is not None and value not in self.choices:
            return "must be one of " + ", ".join(_fmt_opt(c) for c in self.choices)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:
                return "must be a number, not nan"
            below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            above = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
            if below or above:
                return "must be " + self.describe_range()
        if self.check is not None:
            return self.check(value)
        return None

    def describe_range(self) -> str:
        """``>= 0``, ``> 0``, ``in 2..16``, ``one of a, b``; empty when anything goes."""
        if self.choices is not None:
            return "one of " + ", ".join(_fmt_opt(c) for c in self.choices)
        lo = None if self.lo is None else _fmt_num(self.lo)
        hi = None if self.hi is None else _fmt_num(self.hi)
        if lo is not None and hi is not None and not self.lo_open and not self.hi_open:
            return f"in {lo}..{hi}"
        parts = []
        if lo is not None:
            parts.append(("> " if self.lo_open else ">= ") + lo)
        if hi is not None:
            parts.append(("< " if self.hi_open else "<= ") + hi)
        return " and ".join(parts)


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**63 else repr(x)


@dataclass(frozen=True)
class PassSpec:
    name: str
    fn: PassFn
    needs: Optional[Stage]
    leaves: Optional[Stage]
    options: dict[str, Any]  # name -> default
    doc: str
    option_specs: dict[str, Opt] = field(default_factory=dict)  # name -> declared limits

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def check_options(self, options: dict[str, Any]) -> None:
        """Raise one QpipeError line for the first option value outside its declared limits."""
        for key, value in options.items():
            spec = self.option_specs.get(key)
            reason = spec.problem(value) if spec is not None else None
            if reason:
                raise QpipeError(f"pass '{self.name}': {key} {reason} (got {key}={_fmt_opt(value)})")


_PASSES: dict[str, PassSpec] = {}
_PIPELINES: dict[str, str] = {}
_entry_points_loaded = False


def register(
    name: str,
    needs: Optional[Stage] = None,
    leaves: Optional[Stage] = None,
    options: Optional[dict[str, Any]] = None,
) -> Callable[[PassFn], PassFn]:
    """Register a pass under ``name``. ``needs``/``leaves`` None means "any, unchanged".

    ``options`` maps each option to its default or to an :class:`Opt` (default and
    limits); values are checked when a pipeline string is parsed.

    A name is registered once: a second pass of the same name is an error (it
    would silently replace the first), and so is a name taken by a named pipeline.
    """
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise ValueError(f"pass names are lower-case words joined by '-', got {name!r}")

    def deco(fn: PassFn) -> PassFn:
        if name in _PASSES:
            where = getattr(_PASSES[name].fn, "__module__", "?")
            raise QpipeError(f"pass '{name}' is already registered (by {where}); pick another name")
        if name in _PIPELINES:
            raise QpipeError(f"'{name}' is already the name of a pipeline; pick another pass name")
        specs = {k: v if isinstance(v, Opt) else Opt(v) for k, v in (options or {}).items()}
        defaults = {k: o.default for k, o in specs.items()}
        _PASSES[name] = PassSpec(name, fn, needs, leaves, defaults, fn.__doc__ or "", specs)
        return fn

    return deco


def register_pipeline(name: str, pipeline: str) -> None:
    """Name a pipeline string (e.g. ``default``) so it can be used as one step."""
    if name in _PASSES or (name in _PIPELINES and _PIPELINES[name] != pipeline):
        raise QpipeError(f"'{name}' is already registered; pick another pipeline name")
    _PIPELINES[name] = pipeline


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="qpipe.passes"):
        ep.load()


_LOADED_FILES: dict[str, list[str]] = {}


def load_pass_file(path: str) -> list[str]:
    """Import a user's Python file whose ``@register`` calls add passes; returns their names.

    Loading the same file again returns the names it registered the first time.
    """
    if not os.path.isfile(path):
        raise QpipeError(f"--load: no such file: {path}")
    key = os.path.realpath(path)
    if key in _LOADED_FILES:
        return list(_LOADED_FILES[key])
    before = set(_PASSES)
    mod_name = "qpipe_user_pass_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise QpipeError(f"--load: cannot import {path} (not a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: say which and why, in one line
        raise QpipeError(f"--load {path}: {type(exc).__name__}: {exc}") from exc
    _LOADED_FILES[key] = sorted(set(_PASSES) - before)
    return list(_LOADED_FILES[key])


def get_pass(name: str) -> PassSpec:
    _load_entry_points()
    if name not in _PASSES:
        close = difflib.get_close_matches(name, list(_PASSES) + list(_PIPELINES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise QpipeError(f"unknown pass '{name}'{hint}; see --list-passes")
    return _PASSES[name]


def list_passes() -> list[PassSpec]:
    _load_entry_points()
    return [_PASSES[k] for k in sorted(_PASSES)]


def named_pipelines() -> dict[str, str]:
    return dict(_PIPELINES)


# ---------------------------------------------------------------------------
# pipeline strings


@dataclass
class Step:
    spec: PassSpec
    options: dict[str, Any]

    def __str__(self) -> str:
        changed = {k: v for k, v in self.options.items() if self.spec.options.get(k) != v}
        if not changed:
            return self.spec.name
        return self.spec.name + "{" + ",".join(f"{k}={_fmt_opt(v)}" for k, v in sorted(changed.items())) + "}"


@dataclass
class Pipeline:
    steps: list[Step]

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)

    def full_string(self) -> str:
        """Every option written out, defaults too: what a reproduction needs."""
        out = []
        for s in self.steps:
            if s.options:
                out.append(s.spec.name + "{" + ",".join(f"{k}={_fmt_opt(v)}" for k, v in sorted(s.options.items())) + "}")
            else:
                out.append(s.spec.name)
        return ",".join(out)


def _fmt_opt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise QpipeError(f"pipeline '{text}': unbalanced '}}'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise QpipeError(f"pipeline '{text}': unbalanced '{{'")
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _coerce(pass_name: str, key: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise QpipeError(
            f"pass '{pass_name}': option {key}={raw!r} is not a valid {type(default).__name__}"
        ) from None
    return raw


def parse_pipeline(text: str, _depth: int = 0) -> Pipeline:
    """Parse ``name{k=v,...},name,...``; named pipelines expand in place."""
    _load_entry_points()
    if _depth > 8:
        raise QpipeError("named pipelines nest too deeply (a cycle?)")
    if not text or not text.strip():
        raise QpipeError("empty pipeline")
    steps: list[Step] = []
    for item in _split_top(text.strip()):
        m = re.fullmatch(r"([A-Za-z0-9_-]+)\s*(?:\{(.*)\})?", item, flags=re.S)
        if not m:
            raise QpipeError(f"cannot parse pipeline element '{item}' (expected name or name{{k=v,...}})")
        name, opts_text = m.group(1), m.group(2)
        if name in _PIPELINES and name not in _PASSES:
            if opts_text:
                raise QpipeError(f"named pipeline '{name}' takes no options; spell its passes out instead")
            steps += parse_pipeline(_PIPELINES[name], _depth + 1).steps
            continue
        spec = get_pass(name)
        options = dict(spec.options)
        if opts_text:
            for kv in opts_text.split(","):
                if not kv.strip():
                    continue
                if "=" not in kv:
                    raise QpipeError(f"pass '{name}': option '{kv.strip()}' needs a value (k=v)")
                key, raw = (s.strip() for s in kv.split("=", 1))
                if key not in spec.options:
                    known = ", ".join(sorted(spec.options)) or "none"
                    raise QpipeError(f"pass '{name}' has no option '{key}' (options: {known})")
                options[key] = _coerce(name, key, raw, spec.options[key])
        spec.check_options(options)  # ranges, choices, files: now, not after loading the model
        steps.append(Step(spec, options))
    return Pipeline(steps)


def check_stages(pipeline: Pipeline, start: Stage) -> None:
    """Fail before running anything if a pass would get a graph at the wrong stage."""
    stage = start
    previous = "the frontend"
    for step in pipeline.steps:
        spec = step.spec
        if spec.needs is not None and spec.needs != stage:
            raise QpipeError(
                f"pipeline stages don't fit: '{spec.name}' needs a {spec.needs} graph, "
                f"but gets a {stage} graph after {previous}"
            )
        if spec.leaves is not None:
            stage = spec.leaves
        previous = f"'{spec.name}'"


# ---------------------------------------------------------------------------
# running


@dataclass
class Instrumentation:
    print_after_all: bool = False
    print_after_change: bool = False
    print_diff: bool = False
    dump_dir: Optional[str] = None
    verify_each: bool = True
    write: Callable[[str], None] = lambda text: sys.stderr.write(text)


@dataclass
class PassRecord:
    """``seconds``: the pass and the runner's bookkeeping after it; ``verify_seconds``: the verifier alone."""

    name: str
    step: str
    seconds: float
    modified: bool
    stats: dict[str, Any]
    verify_seconds: float = 0.0


@dataclass
class PipelineRun:
    gm: GraphModule
    pipeline: Pipeline
    records: list[PassRecord]


def ir_diff(before: str, after: str, a_name: str = "before", b_name: str = "after") -> str:
    if before == after:
        return "no change\n"
    return "".join(
        difflib.unified_diff(before.splitlines(True), after.splitlines(True), a_name, b_name, n=1)
    )


def run_pipeline(
    gm: GraphModule,
    pipeline: Pipeline | str,
    state: Optional[PipelineState] = None,
    instrument: Optional[Instrumentation] = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> PipelineRun:
    if isinstance(pipeline, str):
        pipeline = parse_pipeline(pipeline)
    instrument = instrument or Instrumentation()
    state = state if state is not None else PipelineState()
    check_stages(pipeline, graph_stage(gm))
    if instrument.dump_dir:
        os.makedirs(instrument.dump_dir, exist_ok=True)
    want_text = (
        instrument.print_after_all
        or instrument.print_after_change
        or instrument.print_diff
        or instrument.dump_dir
    )
    text = print_ir(gm) if want_text else ""
    if instrument.dump_dir:
        _write(os.path.join(instrument.dump_dir, "000_input.txt"), text)
    records: list[PassRecord] = []
    for index, step in enumerate(pipeline.steps, start=1):
        spec = step.spec
        ctx = PassContext(options=dict(step.options), state=state, pass_name=spec.name, progress=progress, log=log)
        ran_before = [r.name for r in records]
        started = time.perf_counter()
        try:
            result = spec.fn(gm, ctx)
        except QpipeError as exc:
            raise PassFailure(spec.name, ran_before, str(exc)) from exc
        except Exception as exc:
            raise PassFailure(spec.name, ran_before, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise PassFailure(spec.name, ran_before, f"returned {type(result).__name__}, not PassResult")
        gm = result.gm
        try:
            _bookkeeping(gm, bool(result.modified))
        except Exception as exc:
            raise PassFailure(spec.name, ran_before, f"left a broken graph: {type(exc).__name__}: {exc}") from exc
        if spec.leaves is not None:
            set_graph_stage(gm, spec.leaves)
        seconds = time.perf_counter() - started
        verify_seconds = 0.0
        if instrument.verify_each:
            started = time.perf_counter()
            try:
                verify(gm, graph_stage(gm))
            except QpipeError as exc:
                raise PassFailure(spec.name, ran_before, str(exc)) from exc
            verify_seconds = time.perf_counter() - started
        records.append(PassRecord(spec.name, str(step), seconds, bool(result.modified), dict(result.stats), verify_seconds))
        log(f"{spec.name}: {seconds:.2f}s (+{verify_seconds:.2f}s verify) {_fmt_stats(result.stats)}")
        if want_text:
            new_text = print_ir(gm)
            label = f"{index:03d}_{spec.name}"
            changed = new_text != text
            if instrument.print_after_all or (instrument.print_after_change and changed):
                instrument.write(f"// ----- IR after {spec.name} -----\n{new_text}")
            if instrument.print_diff:
                instrument.write(f"// ----- diff after {spec.name} -----\n{ir_diff(text, new_text, 'before ' + spec.name, 'after ' + spec.name)}")
            if instrument.dump_dir:
                _write(os.path.join(instrument.dump_dir, label + ".txt"), new_text)
            text = new_text
    return PipelineRun(gm, pipeline, records)


def _bookkeeping(gm: GraphModule, modified: bool) -> None:
    """What every pass would otherwise repeat: a sound graph, fresh code, fresh shapes."""
    gm.graph.lint()
    gm.recompile()
    if modified and any(n.op == "placeholder" and "val" in n.meta for n in gm.graph.nodes):
        propagate_meta(gm)


def _fmt_stats(stats: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in stats.items())


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
