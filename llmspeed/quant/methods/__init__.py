"""Registry of quantization methods: how a float weight becomes integer codes, scales and zero points.

A method is registered under a name with one line::

    register_method("hqq", weight=hqq_weight)                          # per weight, data-free
    register_method("gptq", model=gptq_model, needs_calibration=True)  # takes over the model loop

Two kinds of entry, chosen by which function is given:

* ``weight=fn``: ``fn(weight [out, in] float, config: QuantConfig, **options) -> QuantizedWeight``.
  :func:`llmspeed.quantize` calls it once per selected layer and builds the module with
  ``cls.from_codes``. It never sees the model.
* ``model=fn``: ``fn(model: CausalLM, plan: dict[name, QuantConfig], calibration, **options)
  -> dict[name, nn.Module]``. It owns the whole loop (GPTQ runs the model layer by layer on
  ``calibration`` inputs and quantizes each layer with the errors of the previous ones). It returns
  a quantized module for every name in ``plan`` (build them with ``Int4Linear.from_codes`` etc.).
  It may install modules with ``model.replace_linear`` as it goes (e.g. to feed quantized outputs
  forward); :func:`llmspeed.quantize` snapshots every layer first, restores them all if the
  function raises, and installs the returned modules when it succeeds.

``calibration`` is whatever the caller passed to ``quantize(..., calibration=...)`` (token ids,
text, ...; the method documents what it accepts); ``options`` are ``quantize``'s extra keyword
arguments (``method_options``). Methods with ``needs_calibration=True`` get a ``ValueError`` from
``quantize`` when ``calibration`` is missing.
"""

from __future__ import annotations

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
) -> Method:
    """Register (or replace) method ``name``; see the module docstring for the two function kinds."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier-like string; got {name!r}")
    method = Method(name, weight, model, needs_calibration)
    METHODS[name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` listing the registered ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}; got {name!r}")
    return METHODS[name]


from . import rtn  # noqa: E402,F401  (registers "rtn")

# Calibrated methods register themselves on import; missing modules are simply not offered.
for _name in ("gptq", "hqq", "awq"):
    try:
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"{__name__}.{_name}":
            raise
