"""``amx``: int8 weights times float activations on Intel AMX tiles, for prompt-sized batches of rows.

The C++ source (``amx_cpu.cpp`` next to this file) multiplies in bf16 tiles with fp32 accumulation. The
int8 codes are exact in bf16 and fp32 activations are split into two bf16 parts (``x = hi + lo`` to
2^-17 relative), so the result is fp32-grade, not a bf16 approximation: the kernel passes the same
tolerance against the reference as the fp32 kernels and ``kernel="auto"`` may time and pick it.
bf16 activations need one product, fp32 and fp16 two. It builds like the ``cpp`` kernel (on first use,
cached per CPU) and reports itself unavailable on CPUs or compilers without AMX-BF16.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ... import cpp_build
from ...protocol import QuantizedLinear
from .registry import FLOAT_DTYPES, Kernel, register_kernel

SOURCE = Path(__file__).with_name("amx_cpu.cpp")
_FUNCTIONS = ["int8_matmul_amx", "amx_usable"]


@lru_cache(maxsize=1)
def _build() -> tuple[ModuleType | None, str | None]:
    ext, reason = cpp_build.build("llmspeed_amx_cpu", SOURCE, _FUNCTIONS)
    if ext is not None and not ext.amx_usable():
        return None, "this CPU (or the compiler's -march=native) has no AMX-BF16 tiles, or the OS did not grant them"
    return ext, reason


def extension() -> Any:
    """The compiled extension (building it on first call), or ``None`` when unavailable."""
    return _build()[0]


def unavailable() -> str | None:
    """Why the AMX kernel cannot run here, or ``None`` (builds it on first call)."""
    return _build()[1]


def amx_int8(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """int8 codes x activations on AMX bf16 tiles; fp32 accumulation; the row scale applied on store."""
    return bind_amx_int8(module)(x)


def bind_amx_int8(module: QuantizedLinear):
    """``fn(x) -> y`` with the extension function and the module's tensors looked up once."""
    f, qweight, scales = extension().int8_matmul_amx, module.qweight, module.scales
    fp32 = torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]: any leading dims
        if x.dtype == fp32:
            return f(x, qweight, scales, True)
        return f(x.float(), qweight, scales, x.dtype != torch.bfloat16).to(x.dtype)

    return run


register_kernel(
    Kernel("amx", ("int8",), ("cpu",), FLOAT_DTYPES, amx_int8,
           "int8 weights on Intel AMX bf16 tiles, fp32 accumulation, activations split hi+lo (fp32-grade)",
           unavailable, binder=bind_amx_int8, any_leading_dims=True)
)  # fmt: skip
