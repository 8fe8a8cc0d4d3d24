"""The reference kernel (dequantize, then ``F.linear`` in the activation dtype: pure torch, the test oracle) and its
fp32 variant ``dequant_fp32`` (whose dequantization runs in one C++ pass on CPUs where the extension is built)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpp import dequantize_rows
from .registry import FLOAT_DTYPES, Kernel, register_kernel


def reference(module, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """Dequantize the whole weight in ``x.dtype`` and multiply: the oracle every kernel is tested against."""
    return F.linear(x, module.packed_dequantize(x.dtype))


BLOCK_BYTES = 1 << 22  # fp32 bytes of weight dequantized at a time by dequant_fp32 (4 MB: fastest of 1/4/whole here)


def _fp32_rows(module, rows: slice) -> torch.Tensor:  # [r, in] fp32
    """``module.packed_dequantize(torch.float32, rows)``: one C++ pass on the CPU where the extension is built
    (about five torch passes over the block otherwise), the same values either way."""
    fast = dequantize_rows(module, rows)
    return module.packed_dequantize(torch.float32, rows) if fast is None else fast


def dequant_fp32(module, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """Dequantize to fp32 and multiply in fp32 (faster than bf16/fp16 matmul on CPUs without native bf16).

    The weight is dequantized ``BLOCK_BYTES`` of fp32 at a time, a block of output rows, and each block
    is multiplied at once. The blocks reuse allocator memory. A whole 4096x4096 weight would be a 67 MB
    temporary, and more for its intermediate steps, each allocation faulting in fresh pages: on a 2-core
    CPU the blocked path was faster for every format (docs/kernels.md). SmolLM2's layers (3.5 MB in
    fp32) fit in one block. On accelerators the blocks only multiply kernel launches, so there the whole
    weight is dequantized at once.
    """
    xf = x.float()  # [M, in]
    n, k = module.out_features, module.in_features
    rows = max(1, BLOCK_BYTES // (4 * k))
    if rows >= n or x.device.type != "cpu" or (torch.is_grad_enabled() and xf.requires_grad):
        return F.linear(xf, _fp32_rows(module, slice(None))).to(x.dtype)
    out = torch.empty(xf.shape[0], n, dtype=torch.float32, device=x.device)  # [M, out]
    for i in range(0, n, rows):
        block = _fp32_rows(module, slice(i, i + rows))  # [r, in]
        torch.mm(xf, block.t(), out=out[:, i : i + rows])  # [M, r]
    return out.to(x.dtype)


register_kernel(
    Kernel("reference", ("int8", "int4", "nf4"), ("cpu", "cuda"), FLOAT_DTYPES, reference,
           "dequantize to the activation dtype, then F.linear (the test oracle)", int8_groups=True)
)  # fmt: skip
register_kernel(
    Kernel("dequant_fp32", ("int8", "int4", "nf4"), ("cpu", "cuda"), FLOAT_DTYPES, dequant_fp32,
           "dequantize to fp32, F.linear in fp32, cast back", int8_groups=True)
)  # fmt: skip
