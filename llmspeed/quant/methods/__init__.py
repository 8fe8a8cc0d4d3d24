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

from . import hqq, rtn  # noqa: F401  (register the per-weight methods "rtn" and "hqq")
from .registry import METHODS, Method, QuantizedWeight, get_method, register_method

# "gptq", "awq" and "awq+gptq" need the quantized modules and the calibration machinery, which sit above
# this package's registry: llmspeed.quant registers them after importing both (see llmspeed/quant/__init__.py).

__all__ = ["METHODS", "Method", "QuantizedWeight", "get_method", "register_method"]
