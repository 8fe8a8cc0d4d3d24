"""``amx``: int8, int4 and NF4 weights times float activations on Intel AMX tiles, for prompt-sized M.

The C++ source (``amx_cpu.cpp`` next to this file) multiplies in bf16 tiles with fp32 accumulation.
fp32 activations are split into two bf16 parts (``x = hi + lo`` to 2^-17 relative). The int8 codes are
exact in bf16 (two products: ``q.hi + q.lo``); a 4-bit weight is decoded to fp32 with its group scale
and split the same way (three products: ``hi.hi + hi.lo + lo.hi``). The result is fp32-grade, not a
bf16 approximation: the kernel passes the same tolerance against the reference as the fp32 kernels and
``kernel="auto"`` may time and pick it. bf16 activations need one product fewer. It builds like the
``cpp`` kernel (on first use, cached per CPU) and reports itself unavailable on CPUs or compilers
without AMX-BF16. 4-bit groups must be a multiple of 32 codes (one tile step).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ... import cpp_build
from ...protocol import QuantizedLinear
from .cpp import group_scales_fp16
from .registry import FLOAT_DTYPES, Kernel, register_kernel

SOURCE = Path(__file__).with_name("amx_cpu.cpp")
HEADERS = [Path(__file__).with_name("amx_tiles.h"), Path(__file__).with_name("q4_tiles.h")]  # shared with decode_cpu.cpp
_FUNCTIONS = ["int8_matmul_amx", "q4_matmul_amx", "amx_usable"]
TILE = 32  # codes per tile step: a 4-bit group must split into whole steps


@lru_cache(maxsize=1)
def _build() -> tuple[ModuleType | None, str | None]:
    ext, reason = cpp_build.build("llmspeed_amx_cpu", SOURCE, _FUNCTIONS, includes=HEADERS)
    if ext is not None and not ext.amx_usable():
        return None, "this CPU (or the compiler's -march=native) has no AMX-BF16 tiles, or the OS did not grant them"
    return ext, reason


def extension() -> Any:
    """The compiled extension (building it on first call), or ``None`` when unavailable."""
    return _build()[0]


def unavailable() -> str | None:
    """Why the AMX kernel cannot run here, or ``None`` (builds it on first call)."""
    return _build()[1]


def _shape(module: QuantizedLinear, x: torch.Tensor) -> str | None:
    return module.layout.tile_reason(TILE, "the amx 4-bit kernel")


def amx_matmul(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """Codes x activations on AMX bf16 tiles; fp32 accumulation."""
    return bind_amx(module)(x)


def bind_amx(module: QuantizedLinear):
    """``fn(x) -> y`` with the extension function and the module's tensors looked up once."""
    ext, fmt = extension(), module.quant_format
    if fmt == "int8":
        f, qweight, scales = ext.int8_matmul_amx, module.qweight, module.scales

        def call(x: torch.Tensor, split: bool) -> torch.Tensor:
            return f(x, qweight, scales, split)
    else:
        f4, args = ext.q4_matmul_amx, (module.qweight, group_scales_fp16(module),
                                       module.zeros if fmt == "int4" else torch.empty(0), module.layout.group,
                                       fmt == "nf4")  # fmt: skip

        def call(x: torch.Tensor, split: bool) -> torch.Tensor:
            return f4(x, *args, split)

    fp32 = torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]: any leading dims
        if x.dtype == fp32:
            return call(x, True)
        return call(x.float(), x.dtype != torch.bfloat16).to(x.dtype)

    return run


register_kernel(
    Kernel("amx", ("int8", "int4", "nf4"), ("cpu",), FLOAT_DTYPES, amx_matmul,
           "quantized weights on Intel AMX bf16 tiles, fp32 accumulation, operands split hi+lo (fp32-grade)",
           unavailable, _shape, binder=bind_amx, any_leading_dims=True)
)  # fmt: skip
