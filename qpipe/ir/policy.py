"""Quantization policy as validated, frozen specs (as torchao's ``QuantizationSpec``).

``insert-observers`` writes one into ``meta["qpolicy"]`` of each observed or
weighted node; calibration and substitution read it. A user pass changes the
policy with ``dataclasses.replace`` (``examples/set_bits.py``), never by poking a
dict: a spec that makes no sense (99 bits, a percentile of 20) fails where it is
made, naming the value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from qpipe.ir.errors import QpipeError

ROLES = ("input", "activation", "output", "weight")
METHODS = ("minmax", "percentile")
SCHEMES = ("per-tensor", "per-channel")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: symmetric, zero point 0, ``bits`` wide.

    ``method``/``percentile`` say how an activation's range is observed (a
    weight's range is always its max); ``role`` says which tensor it is;
    ``unsigned``: the tensor is never negative (a ReLU's output), so its codes
    are ``[0, 2**bits - 1]`` at ``scale = amax / (2**bits - 1)``.
    """

    bits: int = 8
    role: str = "activation"
    method: str = "minmax"
    percentile: float = 100.0
    scheme: str = "per-tensor"
    unsigned: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 16:
            raise QpipeError(f"bit width must be an integer in 2..16, got {self.bits!r}")
        if self.role not in ROLES:
            raise QpipeError(f"quantization role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.method not in METHODS:
            raise QpipeError(f"range method must be minmax or percentile, got {self.method!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise QpipeError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.method == "minmax" and float(self.percentile) != 100.0:
            raise QpipeError("a minmax range has no percentile")
        if self.unsigned and (self.bits > 8 or self.role == "weight"):
            raise QpipeError("unsigned codes are for activations of at most 8 bits (stored as uint8)")
        if self.scheme not in SCHEMES:
            raise QpipeError(f"scheme must be per-tensor or per-channel, got {self.scheme!r}")

    @classmethod
    def activation(cls, method_text: str, bits: int, role: str = "activation") -> "QuantSpec":
        """From an option such as ``minmax`` or ``percentile:99.99``."""
        method, pct = parse_range_method(method_text)
        return cls(bits=int(bits), role=role, method=method, percentile=pct)

    def describe(self) -> dict[str, Any]:
        """The fields worth printing (a minmax range has no percentile; per-tensor is the default)."""
        d = asdict(self)
        if self.method == "minmax":
            d.pop("percentile")
        if self.scheme == "per-tensor":
            d.pop("scheme")
        if not self.unsigned:
            d.pop("unsigned")
        return d


@dataclass(frozen=True)
class LayerPolicy:
    """What a compute node (conv, linear, add, activation) is told.

    ``weight``: how its weight is quantized (None: no weight). ``after_activation``:
    its output is read only by an activation, so it is observed after it and the
    activation's clamp folds into its requantization.
    """

    weight: Optional[QuantSpec] = None
    after_activation: bool = False

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.weight is not None:
            d["w_bits"] = self.weight.bits
            d["w_scheme"] = self.weight.scheme
        if self.after_activation:
            d["out"] = "after-activation"
        return d


def parse_range_method(text: str) -> tuple[str, float]:
    """``minmax`` or ``percentile:99.99`` -> (method, percentile)."""
    if text == "minmax":
        return "minmax", 100.0
    if text.startswith("percentile"):
        _, _, value = text.partition(":")
        try:
            p = float(value or "99.99")
        except ValueError:
            raise QpipeError(f"act={text}: percentile must be a number, e.g. percentile:99.99") from None
        if not 50.0 < p <= 100.0:
            raise QpipeError(f"act={text}: percentile must be in (50, 100]")
        return "percentile", p
    raise QpipeError(f"act={text}: expected 'minmax' or 'percentile:P'")
