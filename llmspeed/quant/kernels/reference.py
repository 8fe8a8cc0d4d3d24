"""Pure-torch kernels: the reference (dequantize, then ``F.linear`` in the activation dtype) and its fp32 variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import FLOAT_DTYPES, Kernel, register_kernel


def reference(module, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """Dequantize the whole weight in ``x.dtype`` and multiply: the oracle every kernel is tested against."""
    return F.linear(x, module.dequantize(x.dtype))


def dequant_fp32(module, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """Dequantize to fp32 and multiply in fp32 (faster than bf16/fp16 matmul on CPUs without native bf16)."""
    return F.linear(x.float(), module.dequantize(torch.float32)).to(x.dtype)


register_kernel(
    Kernel("reference", ("int8", "int4", "nf4"), ("cpu", "cuda"), FLOAT_DTYPES, reference,
           "dequantize to the activation dtype, then F.linear (the test oracle)")
)  # fmt: skip
register_kernel(
    Kernel("dequant_fp32", ("int8", "int4", "nf4"), ("cpu", "cuda"), FLOAT_DTYPES, dequant_fp32,
           "dequantize to fp32, F.linear in fp32, cast back")
)  # fmt: skip
