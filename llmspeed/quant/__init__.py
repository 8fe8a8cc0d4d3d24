"""Post-training weight quantization: int8, int4 and NF4 with packed storage and fast matmul kernels.

Layers, bottom up: :mod:`~llmspeed.quant.primitives` (pure functions; the layouts are documented there
and in docs/quantization.md), :mod:`~llmspeed.quant.modules` (``Int8Linear``, ``Int4Linear``,
``NF4Linear``), :mod:`~llmspeed.quant.kernels` (matmul paths and ``kernel="auto"``),
:mod:`~llmspeed.quant.methods` (how codes are chosen: ``"rtn"`` and registered calibrated methods), and
the verbs :func:`quantize`, :func:`save`, :func:`load`, :func:`kernels`.
"""

from __future__ import annotations

from . import primitives
from .api import plan_layers, quantize
from .config import FORMATS, QuantConfig
from .kernels import KERNELS, Kernel, KernelReport, kernels, register_kernel
from .methods import METHODS, QuantizedWeight, register_method
from .modules import Int4Linear, Int8Linear, NF4Linear, QuantizedLinearBase, module_class
from .serialize import load, save

__all__ = [
    "quantize",
    "save",
    "load",
    "kernels",
    "plan_layers",
    "QuantConfig",
    "FORMATS",
    "Int8Linear",
    "Int4Linear",
    "NF4Linear",
    "QuantizedLinearBase",
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
