"""The method registry: names -> how a float weight (or a whole model) becomes codes, scales and zeros.

A leaf module: methods import it to register themselves, and the quantized modules look names up in it.
See :mod:`llmspeed.quant.methods` for the two kinds of entry.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """Output of a per-weight method, in the layouts of :mod:`llmspeed.quant.primitives`.

    Attributes:
        codes: int8 ``[out, in]`` (int8) or uint8 ``[out, in_pad]`` in [0, 15] (int4, nf4), unpacked.
        scales: fp32 ``[out]`` (int8) or ``[out, groups]``; for nf4 the raw (not double-quantized) absmax.
        zeros: fp32 ``[out, groups]`` zero points in the code domain (int4 only), else ``None``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None


@dataclass(frozen=True)
class Method:
    """A registered method: exactly one of ``weight`` and ``model`` is set (see the module docstring)."""

    name: str
    weight: Callable[..., QuantizedWeight] | None = None
    model: Callable[..., dict[str, Any]] | None = None
    needs_calibration: bool = False
    symmetric: bool = False  # honours QuantConfig.symmetric for int4 (fits no zero points of its own)
    rotates: bool = False  # a model method that quantizes layers with QuantConfig.hadamard (per-weight ones all do)
    int8_groups: bool = False  # quantizes int8 with a group_size (a scale per group of input channels)

    def __post_init__(self) -> None:
        if (self.weight is None) == (self.model is None):
            raise ValueError(f"method {self.name!r} must give exactly one of weight= and model=")


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    weight: Callable[..., QuantizedWeight] | None = None,
    model: Callable[..., dict[str, Any]] | None = None,
    needs_calibration: bool = False,
    symmetric: bool = False,
    rotates: bool = False,
    int8_groups: bool = False,
) -> Method:
    """Register (or replace) method ``name``; see the module docstring for the two function kinds.

    ``name`` is identifier-like, or such names joined by ``+`` for a composition (``"awq+gptq"``).
    ``symmetric``: the method honours ``QuantConfig.symmetric`` for int4 (``quantize`` refuses
    ``symmetric=True`` with the others). ``rotates``: a model method that quantizes layers whose config has
    ``hadamard`` (``quantize`` rotates their weights and inputs while it runs, :mod:`llmspeed.quant.hadamard`).
    ``int8_groups``: the method quantizes int8 with a ``group_size`` (``quantize`` refuses it with the others).
    """
    if not isinstance(name, str) or not all(part.isidentifier() for part in name.split("+")):
        raise ValueError(f"name must be identifier-like (parts joined by '+' allowed); got {name!r}")
    method = Method(name, weight, model, needs_calibration, symmetric, rotates, int8_groups)
    METHODS[name] = method
    return method


def symmetric_methods() -> list[str]:
    """Names of the registered methods that honour ``symmetric=True`` for int4."""
    return sorted(name for name, method in METHODS.items() if method.symmetric)


def rotating_methods() -> list[str]:
    """Names of the registered methods that quantize layers with ``hadamard`` (per-weight ones and ``rotates``)."""
    return sorted(name for name, method in METHODS.items() if method.weight is not None or method.rotates)


def check_options(kind: type, accepted: str = "", ok: Callable[[Any], bool] = lambda v: True, /, **values: Any) -> None:
    """``ValueError`` naming the first of ``values`` (method options) that is not a ``kind`` for which ``ok`` holds.

    ``kind``: ``bool``, ``int`` (any integral, not a bool) or ``float`` (any finite real, not a bool);
    ``accepted`` says what is accepted (default: the kind).
    """
    for name, value in values.items():
        real = numbers.Integral if kind is int else numbers.Real
        fits = isinstance(value, bool) if kind is bool else isinstance(value, real) and not isinstance(value, bool)
        if not (fits and (kind is bool or math.isfinite(value)) and ok(value)):
            default = {bool: "a bool", int: "an integer", float: "a finite number"}[kind]
            raise ValueError(f"{name} must be {accepted or default}; got {value!r}")


def get_method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` listing the registered ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}; got {name!r}")
    return METHODS[name]
