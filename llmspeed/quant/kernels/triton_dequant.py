"""``triton_dequant``: one Triton pass from packed codes to a float weight, then cuBLAS (CUDA, any M).

For prefill rows and large decode batches a tensor-core GEMM on a dequantized weight beats every GEMV,
so the ``reference`` path (dequantize, then ``F.linear``) is what ``auto`` used to pick on CUDA above
``M = 16``. Its dequantization is a chain of elementwise torch ops (unpack, subtract, multiply, slice,
cast), each a pass over the whole weight in fp32: on an H100 it cost more than the matmul it fed (a
4096x14336 int4 layer at M = 512: about 7 ms against 0.1 ms for the bf16 ``F.linear``).

This kernel reads each packed byte once and writes the weight once, in the activation dtype:

* a program owns ``BLOCK_N`` output rows and ``BLOCK_J`` byte columns of the packed buffer;
* int8: ``code * scale[row]``; int4: ``(code - zero) * scale`` per group; NF4: ``codebook[code] * scale``
  per group, the scales double-dequantized once per module beforehand (cached like the GEMV's);
* 4-bit scales (and zeros) are loaded once per group: where the group size divides a tile's 256 codes
  (or a tile lies inside one group), the tile is viewed as ``[BLOCK_N, groups in the tile, bytes a group]``
  and each row's ``GPT`` scales are broadcast over their groups; other group sizes (a whole-row group of a
  width that is no power of two, say) load one per byte, as the first version of this kernel did;
* 4-bit bytes hold element ``2j`` in the low nibble and ``2j + 1`` in the high nibble: the two halves
  are joined and flattened, so the store is contiguous; padding columns (``in_features`` not a multiple
  of the group) are masked out.

The arithmetic is the reference's (fp32, then one rounding to the output dtype), so the weight is
bit-identical to ``module.packed_dequantize(dtype)`` (``module.dequantize(dtype)`` unless the layer is act-order
or rotated); the tests check that on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from ...triton_env import unavailable
from .registry import Kernel, register_kernel
from .triton_gemv import DTYPES, operands

BLOCK_N = 32  # output rows per program
BLOCK_J = 128  # packed columns (int8: codes; 4-bit: bytes, i.e. 256 codes) per program

_OUT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def dequant(
        w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr,
        N, K, KB, GROUPS,
        FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, GPT: tl.constexpr,
    ):  # fmt: skip
        # FMT 0: int8 [N, K] with scales [N]; 1: int4 and 2: NF4, bytes [N, KB] with scales (zeros) [N, GROUPS]
        # GPT (4-bit): groups a tile of 2 * BLOCK_J codes meets when they are whole (per_group()), else 0
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # packed columns [BLOCK_J]
        row_ok = rows < N
        ok = row_ok[:, None] & (j < KB)[None, :]  # [BLOCK_N, BLOCK_J]
        q = tl.load(w_ptr + rows[:, None] * KB + j[None, :], mask=ok, other=0)
        if FMT == 0:
            s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)  # [BLOCK_N]
            w = q.to(tl.float32) * s[:, None]
            tl.store(out_ptr + rows[:, None] * K + j[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            b = q.to(tl.int32)
            lo = b & 15
            hi = (b >> 4) & 15
            if GPT > 0:  # one scale (and zero) per row and group of the tile, broadcast over the group's bytes
                HG: tl.constexpr = BLOCK_J // GPT  # bytes a group
                g = (2 * tl.program_id(1) * BLOCK_J) // GROUP + tl.arange(0, GPT)  # the tile's groups [GPT]
                at = rows[:, None] * GROUPS + g[None, :]  # [BLOCK_N, GPT]
                at_ok = row_ok[:, None] & (g < GROUPS)[None, :]
                lo = tl.reshape(lo, (BLOCK_N, GPT, HG))
                hi = tl.reshape(hi, (BLOCK_N, GPT, HG))
            else:  # groups that straddle tiles: a scale (and zero) per byte
                at = rows[:, None] * GROUPS + (2 * j[None, :]) // GROUP  # both nibbles share a group (GROUP even)
                at_ok = ok
            s = tl.load(s_ptr + at, mask=at_ok, other=0.0).to(tl.float32)  # int4: fp16
            if GPT > 0:
                s = tl.reshape(s, (BLOCK_N, GPT, 1))
            if FMT == 1:
                z = tl.load(z_ptr + at, mask=at_ok, other=0.0).to(tl.float32)
                if GPT > 0:
                    z = tl.reshape(z, (BLOCK_N, GPT, 1))
                w_lo = (lo.to(tl.float32) - z) * s
                w_hi = (hi.to(tl.float32) - z) * s
            else:
                w_lo = tl.load(lut_ptr + lo) * s
                w_hi = tl.load(lut_ptr + hi) * s
            w_lo = tl.reshape(w_lo, (BLOCK_N, BLOCK_J))  # back from [BLOCK_N, GPT, HG] where grouped
            w_hi = tl.reshape(w_hi, (BLOCK_N, BLOCK_J))
            w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, 2 * BLOCK_J))  # element 2j, then 2j + 1
            cols = tl.program_id(1) * 2 * BLOCK_J + tl.arange(0, 2 * BLOCK_J)  # [2 * BLOCK_J]
            mask = row_ok[:, None] & (cols < K)[None, :]
            tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)

    return dequant


def per_group(group: int) -> int:
    """Groups a tile of ``2 * BLOCK_J`` codes holds when the group size divides it (a power of two up to the
    tile), 1 when the tile lies inside one group (the group a multiple of the tile), else 0 (a scale per byte)."""
    span = 2 * BLOCK_J
    if group % 2 == 0 and span % group == 0:
        return span // group
    return 1 if group % span == 0 else 0


def dequantize(module, dtype: torch.dtype) -> torch.Tensor:  # [out, in] in dtype
    """``module.packed_dequantize(dtype)`` in one Triton pass over the packed buffers (bit-identical): the stored
    column order and basis, which the kernel's input arrives in (gathered through ``perm``, or rotated); equal
    to ``module.dequantize(dtype)`` for every other layer."""
    if dtype not in _OUT_TYPES:
        raise ValueError(f"dtype must be one of {list(_OUT_TYPES)}; got {dtype}")
    n, k = module.out_features, module.in_features
    out = torch.empty(n, k, device=module.qweight.device, dtype=dtype)
    if n == 0 or k == 0:
        return out
    code, s, z, lut, _, groups, group = operands(module)
    kb = module.qweight.shape[1]  # packed columns: codes (int8) or bytes of two codes (4-bit)
    grid = ((n + BLOCK_N - 1) // BLOCK_N, (kb + BLOCK_J - 1) // BLOCK_J)
    _kernel()[grid](module.qweight, s, z, lut, out, n, k, kb, groups,
                    FMT=code, GROUP=group, BLOCK_N=BLOCK_N, BLOCK_J=BLOCK_J, GPT=per_group(group) if code else 0)  # fmt: skip
    return out


def triton_dequant(module, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out] in x.dtype
    """Dequantize in one Triton pass to ``x.dtype``, then ``F.linear`` (cuBLAS on CUDA)."""
    return F.linear(x, dequantize(module, x.dtype))


register_kernel(
    Kernel("triton_dequant", ("int8", "int4", "nf4"), ("cuda",), DTYPES, triton_dequant,
           "one Triton pass to a float weight in the activation dtype, then F.linear (CUDA, any M)", unavailable)
)  # fmt: skip
