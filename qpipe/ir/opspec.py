"""Ops as data: one :class:`OpSpec` per ``qpipe::`` op, beside its kernels.

The verifier's allowed-op table, the printer, the fusion pass and every backend
read ops through their spec and by argument *name*, never by position, so a new
op is one spec plus its kernels and nothing else has to learn about it.

A spec says what an op is (its :class:`OpKind`), which arguments play which role
(the integer inputs, the weight, the dyadic multiplier and shift, the clamp),
how its output dtype is chosen, and where its output's real scale comes from
(:class:`ScaleRule`). The argument names are the op's own schema names.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.fx import Node


class OpKind(enum.Enum):
    QUANTIZE = "quantize"  # float -> integer: the one boundary into the integer region
    ACCUMULATE = "accumulate"  # int8 x int8 -> wide accumulator (conv, linear, matmul)
    REQUANTIZE = "requantize"  # accumulator or integer -> narrower integer by a dyadic (m, s)
    ELEMENTWISE = "elementwise"  # value-wise integer ops at an unchanged scale (clamp)
    NONLINEARITY = "nonlinearity"  # integer approximations of float functions (softmax, ...)
    LAYOUT = "layout"  # moves or selects integers; values and scale unchanged


class ScaleRule(enum.Enum):
    """Where the real scale of an op's output comes from."""

    ARGUMENT = "argument"  # an argument of the op says it (quantize's ``scale``)
    PRODUCT = "product"  # the product of the inputs' scales (an accumulator: S_x * S_w)
    OBSERVED = "observed"  # set by an observer at calibration; the (m, s) pair gets there
    FIXED = "fixed"  # fixed by the kernel (e.g. a softmax output in [0, 1])
    INHERITED = "inherited"  # the (first) input's scale


@dataclass(frozen=True)
class OpSpec:
    """What the rest of qpipe needs to know about one integer op.

    ``inputs``: the integer tensor arguments whose scales the output's scale
    depends on; ``weight``: a constant integer tensor quantized per output
    channel; ``multipliers``/``shift``: the dyadic pair(s), int64 tensor constants
    (one ``m`` per input for ops that add rescaled inputs); ``clamp``: the names of
    the integer bounds; ``out_bits``: the argument that picks the output dtype
    (``dtype_for_bits``); ``channel_dim``: the output's per-channel axis for
    per-channel scales; ``fused``: the op that ``fuse-requant`` makes of this
    accumulator followed by a ``requant``.
    """

    op: Any  # torch OpOverload
    kind: OpKind
    scale_rule: ScaleRule
    inputs: tuple[str, ...] = ()
    weight: Optional[str] = None
    bias: Optional[str] = None
    multipliers: tuple[str, ...] = ()
    shift: Optional[str] = None
    clamp: Optional[tuple[str, str]] = None
    out_bits: Optional[str] = None
    scale_arg: Optional[str] = None
    channel_dim: Optional[int | str] = None  # an int, or the name of the argument holding it
    fused: Optional[str] = None  # name of the fused accumulate+requantize op
    fixed_scale: Optional[Callable[[dict[str, Any]], float]] = None
    # OBSERVED ops whose (m, s) multiplies a product, not an input (x * gate, a * b, a mean):
    # (the inputs' per-tensor scales, the bound arguments) -> the real scale of that product
    product_scale: Optional[Callable[[tuple[float, ...], dict[str, Any]], float]] = None
    doc: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return self.op._schema.name.split("::", 1)[1]

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.op._schema.arguments)

    def bind(self, node: Node) -> dict[str, Any]:
        """The node's arguments by name (defaults filled in from the schema)."""
        values: dict[str, Any] = {}
        schema_args = self.op._schema.arguments
        for i, arg in enumerate(schema_args):
            if i < len(node.args):
                values[arg.name] = node.args[i]
            elif arg.name in node.kwargs:
                values[arg.name] = node.kwargs[arg.name]
            elif arg.has_default_value():
                values[arg.name] = arg.default_value
            else:
                raise ValueError(f"%{node.name} = qpipe.{self.name}: argument '{arg.name}' missing")
        return values

    def args_from(self, values: dict[str, Any]) -> tuple[Any, ...]:
        """Positional arguments for this op from a name -> value map (extra names ignored; an argument
        with a schema default may be left out, and trailing defaults are not written)."""
        schema_args = self.op._schema.arguments
        missing = [a.name for a in schema_args if a.name not in values and not a.has_default_value()]
        if missing:
            raise ValueError(f"qpipe.{self.name}: no value for {', '.join(missing)}")
        out = [values[a.name] if a.name in values else a.default_value for a in schema_args]
        while schema_args and len(out) > 0 and schema_args[len(out) - 1].has_default_value() \
                and out[-1] == schema_args[len(out) - 1].default_value and type(out[-1]) is type(schema_args[len(out) - 1].default_value):
            out.pop()  # a default at the end is left to the schema: the printed IR of older graphs stays the same
        return tuple(out)

    def output_channel_dim(self, values: dict[str, Any], ndim: int) -> Optional[int]:
        cd = self.channel_dim
        if isinstance(cd, str):
            cd = int(values[cd])
        if cd is None:
            return None
        return cd % ndim if ndim else cd


_SPECS: dict[Any, OpSpec] = {}


def register_spec(spec: OpSpec) -> OpSpec:
    if spec.op in _SPECS:
        raise ValueError(f"qpipe.{spec.name} already has an OpSpec")
    names = set(spec.arg_names)
    named = [*spec.inputs, *spec.multipliers, *(spec.clamp or ())]
    named += [n for n in (spec.weight, spec.bias, spec.shift, spec.out_bits, spec.scale_arg) if n]
    if isinstance(spec.channel_dim, str):
        named.append(spec.channel_dim)
    unknown = [n for n in named if n not in names]
    if unknown:
        raise ValueError(f"OpSpec of qpipe.{spec.name} names arguments its schema lacks: {unknown}")
    _SPECS[spec.op] = spec
    return spec


def spec_for(target: Any) -> Optional[OpSpec]:
    """The spec of a ``qpipe::`` op overload, or None for anything else."""
    return _SPECS.get(target)


def spec_of(node: Node) -> Optional[OpSpec]:
    return _SPECS.get(node.target) if node.op == "call_function" else None


def spec_by_name(name: str) -> OpSpec:
    for spec in _SPECS.values():
        if spec.name == name:
            return spec
    raise KeyError(f"no qpipe op named {name!r}")


def all_specs() -> list[OpSpec]:
    return list(_SPECS.values())


def qpipe_op(name: str, **spec_fields: Any):
    """Define ``qpipe::name`` with ``torch.library.custom_op`` and register its spec.

    The decorated function is the exact integer reference kernel; register the
    fake kernel on the returned op as usual (``@op.register_fake``).
    """

    def deco(fn: Callable) -> Any:
        op = torch.library.custom_op(f"qpipe::{name}", mutates_args=())(fn)
        register_spec(OpSpec(op=op._opoverload, doc=(fn.__doc__ or "").strip(), **spec_fields))
        return op

    return deco
