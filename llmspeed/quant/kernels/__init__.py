"""Matmul kernels for quantized linears: the registry, the implementations, and ``kernel="auto"``.

Each implementation module registers its kernels on import (:mod:`.reference`, :mod:`.aten`,
:mod:`.cpp`, :mod:`.amx`, :mod:`.triton_gemv`, :mod:`.triton_mm`, :mod:`.triton_dequant`); :mod:`.auto` picks among them per shape
and machine. Kernels read a module through the protocol's ``QuantizedLinear`` (its packed buffers and
its :class:`~llmspeed.quant.layout.QuantLayout`), never through the module classes.
"""

from __future__ import annotations

from . import amx, aten, cpp, reference, triton_dequant, triton_gemv, triton_mm  # noqa: F401  (register the kernels)
from .auto import AUTO_RULES, auto_kernel, probe, select, tune_model
from .registry import (
    FLOAT_DTYPES,
    KERNELS,
    Kernel,
    check_kernel,
    check_kernel_name,
    get_kernel,
    kernel_names,
    register_kernel,
    usable_kernels,
)

__all__ = [
    "KERNELS",
    "FLOAT_DTYPES",
    "Kernel",
    "register_kernel",
    "get_kernel",
    "kernel_names",
    "check_kernel_name",
    "usable_kernels",
    "select",
    "auto_kernel",
    "probe",
    "check_kernel",
    "AUTO_RULES",
    "tune_model",
]
