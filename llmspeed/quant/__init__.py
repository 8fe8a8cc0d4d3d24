"""Post-training weight quantization: int8, int4 and NF4 with packed storage and fast matmul kernels.

Layers, bottom up (each imports only those below it; a test checks the import graph has no cycle):

* :mod:`~llmspeed.quant.config` (plain data), :mod:`~llmspeed.quant.layout` (a packed weight's
  geometry), :mod:`~llmspeed.quant.primitives` (pure functions; the layouts are documented there and
  in docs/quantization.md);
* :mod:`~llmspeed.quant.methods` (the method registry and the per-weight methods ``"rtn"``, ``"hqq"``)
  and :mod:`~llmspeed.quant.kernels` (matmul paths and ``kernel="auto"``, typed against the protocol);
* :mod:`~llmspeed.quant.modules` (``Int8Linear``, ``Int4Linear``, ``NF4Linear``, over
  :mod:`~llmspeed.quant.linear_base`);
* :mod:`~llmspeed.quant.calibration` and the model-level methods ``"gptq"``, ``"awq"`` and
  ``"awq+gptq"`` (registered here);
* the verbs :func:`quantize`, :func:`save`, :func:`load` and the report :func:`llmspeed.kernels`
  (:mod:`~llmspeed.quant.report`).
"""

from __future__ import annotations

from . import primitives
from .api import SENSITIVE, plan_layers, quantize
from .config import FORMATS, QuantConfig
from .embedding import QuantizedEmbedding
from .kernels import KERNELS, Kernel, register_kernel
from .layout import QuantLayout
from .methods import (  # noqa: F401  (gptq registers "gptq")
    METHODS,
    QuantizedWeight,
    awq,  # noqa: F401,E402  (registers "awq" and "awq+gptq")
    gptq,
    register_method,
)
from .modules import Int4Linear, Int8Linear, NF4Linear, QuantizedLinearBase, module_class
from .report import KernelReport
from .serialize import load, save

__all__ = [
    "quantize",
    "save",
    "load",
    "plan_layers",
    "SENSITIVE",
    "QuantConfig",
    "QuantLayout",
    "FORMATS",
    "Int8Linear",
    "Int4Linear",
    "NF4Linear",
    "QuantizedLinearBase",
    "QuantizedEmbedding",
    "module_class",
    "QuantizedWeight",
    "METHODS",
    "register_method",
    "KERNELS",
    "Kernel",
    "KernelReport",
    "register_kernel",
    "primitives",
]
