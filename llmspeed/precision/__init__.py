"""Precision: fp16/bf16 casting with fp32 where it matters, autocast, and fast 16-bit matmul on CPUs.

* :mod:`.cast`: :func:`cast` a model in place (norms and rotary tables stay fp32), :func:`attach` its
  run-time hooks to a model loaded in 16 bits, :func:`autocast`;
* :mod:`.cpu_matmul`: on CPUs without fast 16-bit GEMM, 16-bit linear layers run an fp32 matmul over
  weight blocks converted on the fly when that is measured to be faster for the call's rows.
"""

from __future__ import annotations

from . import cpu_matmul
from .cast import CPU_MATMUL, DTYPES, Fp16OverflowError, attach, autocast, cast, resolve_dtype

__all__ = ["CPU_MATMUL", "DTYPES", "Fp16OverflowError", "attach", "autocast", "cast", "cpu_matmul", "resolve_dtype"]
