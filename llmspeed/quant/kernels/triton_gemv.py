"""``triton``: a weight-only dequantize-GEMV for CUDA decode rows (int8, int4, NF4), written in Triton.

On CUDA the aten paths leave gaps: ``_weight_int8pack_mm`` measured 0.11x bf16 ``F.linear`` on an H200,
NF4 had only the dequantize-then-matmul reference, and tinygemm (int4) needs its own weight copy and
bf16 activations. This kernel reads llmspeed's packed buffers as they are (no converted copy):

* each program owns ``BLOCK_N`` output rows (16, 32 or 64, autotuned per shape) and one activation row; it walks ``K`` in steps of
  ``BLOCK_K`` codes, decodes them in registers (int8: widen; int4: ``(q - zero) * scale``; NF4: a
  16-entry codebook lookup times the group's absmax), multiplies by the activations and accumulates in
  fp32, so the weight is read once per activation row;
* 4-bit rows hold element ``2j`` in the low nibble of byte ``j`` and ``2j + 1`` in the high nibble, so
  a tile of bytes meets the even and the odd activations of its span; ``BLOCK_K`` divides the group
  size, so a tile needs one scale (and zero) per row;
* split-K: ``SPLIT_K`` programs share a row block, each walking a contiguous share of the ``K`` tiles and
  adding its partial sums into the fp32 output with ``atomic_add`` (``SPLIT_K = 1`` stores them). A
  layer with few output rows (a down projection: 4096 rows are 64 programs of 64 rows, for 132 SMs)
  otherwise leaves most of the GPU idle; the autotuner picks the split per shape with the block size.

It is a candidate for small ``M`` (decode) only: on accelerators ``kernel="auto"`` times every usable
candidate once per shape bucket and keeps the fastest (see :mod:`llmspeed.quant.kernels`), so it is
picked only where it measures faster. Triton ships with CUDA builds of torch; without it (or without a
CUDA device) the kernel reports itself unavailable. The tests run it on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from ...protocol import QuantizedLinear
from ...triton_env import interpreted, unavailable
from ..primitives import NF4_CODEBOOK
from .registry import Kernel, register_kernel

MAX_ROWS = 16  # above this, a tensor-core GEMM (tinygemm, dequantize + F.linear) is the better candidate
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


BLOCK_NS = (16, 32, 64)  # rows per program tried by the autotuner (one fixed size in the interpreter)
SPLIT_KS = (1, 2, 4, 8)  # programs sharing a row block's K tiles, tried by the autotuner with 4 warps


def configs() -> list[tuple[int, int, int]]:
    """The autotuner's ``(BLOCK_N, SPLIT_K, num_warps)`` candidates: every block size and split with 4 warps,
    and every block size unsplit with 2 (the candidates before split-K)."""
    return [(bn, sk, 4) for bn in BLOCK_NS for sk in SPLIT_KS] + [(bn, 1, 2) for bn in BLOCK_NS]


@lru_cache(maxsize=1)
def _jit() -> Any:
    """The kernel itself, every tile size a ``tl.constexpr`` (:func:`_kernel` wraps it in the autotuner)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(
        x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, y_ptr,
        N, K, KP, GROUPS, M_ROWS,
        FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        # FMT 0: int8 [N, K] with scales [N]; 1: int4 and 2: NF4, bytes [N, KP // 2] with scales (zeros) [N, GROUPS]
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        split = tl.program_id(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        tiles = tl.cdiv(K if FMT == 0 else KP, BLOCK_K)
        share = tl.cdiv(tiles, SPLIT_K)  # this program's K tiles: [first, last)
        first = split * share
        last = tl.minimum(first + share, tiles)
        if FMT == 0:
            for t in range(first, last):
                cols = t * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
                col_ok = cols < K
                x = tl.load(x_ptr + m * K + cols, mask=col_ok, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0)
                acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            acc = acc * tl.load(s_ptr + rows, mask=row_ok, other=0.0)
        else:
            HALF: tl.constexpr = BLOCK_K // 2
            for t in range(first, last):
                k0 = t * BLOCK_K
                j = k0 // 2 + tl.arange(0, HALF)  # byte columns [HALF]
                even = 2 * j
                x_even = tl.load(x_ptr + m * K + even, mask=even < K, other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + m * K + even + 1, mask=even + 1 < K, other=0.0).to(tl.float32)
                b = tl.load(w_ptr + rows[:, None] * (KP // 2) + j[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
                lo = b & 15
                hi = (b >> 4) & 15
                g = k0 // GROUP
                s = tl.load(s_ptr + rows * GROUPS + g, mask=row_ok, other=0.0).to(tl.float32)  # [BLOCK_N] (int4: fp16)
                if FMT == 1:
                    z = tl.load(z_ptr + rows * GROUPS + g, mask=row_ok, other=0.0).to(tl.float32)
                    part = tl.sum(lo.to(tl.float32) * x_even[None, :] + hi.to(tl.float32) * x_odd[None, :], axis=1)
                    xsum = tl.sum(x_even, axis=0) + tl.sum(x_odd, axis=0)
                    acc += s * (part - z * xsum)
                else:
                    wl = tl.load(lut_ptr + lo)
                    wh = tl.load(lut_ptr + hi)
                    acc += s * tl.sum(wl * x_even[None, :] + wh * x_odd[None, :], axis=1)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * N + rows, acc, mask=row_ok)
        else:  # y starts at zero (triton_gemv allocates it so; the autotuner resets it between its trials)
            tl.atomic_add(y_ptr + m * N + rows, acc, mask=row_ok)

    return gemv


@lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton

    # Few rows per program mean many programs (a 14336-row layer at 64 rows is 224 programs for 132 SMs,
    # under two unbalanced waves); more rows mean fewer activation reloads; a split shares a block's K tiles
    # among programs. The autotuner times each configuration once per (N, K, format, M) on first use, outside
    # any CUDA graph capture (the generator and the benchmarks run a kernel before capturing it).
    candidates = [triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=w) for bn, sk, w in configs()]
    if interpreted():
        candidates = [triton.Config({"BLOCK_N": 64, "SPLIT_K": 2}, num_warps=4)]  # the atomic path, checked by the tests
    return triton.autotune(configs=candidates, key=["N", "K", "FMT", "M_ROWS"], reset_to_zero=["y_ptr"])(_jit())


def _block_k(module: QuantizedLinear) -> int:
    """Codes per K tile: 256 for int8; for 4-bit, a tile that divides the group (at most 128 codes)."""
    layout = module.layout
    if not layout.four_bit:
        return 256
    block_k = 128
    while not layout.tiles_of(block_k):
        block_k //= 2
    return block_k


def _shape(module: QuantizedLinear, x: torch.Tensor) -> str | None:
    m = x.reshape(-1, x.shape[-1]).shape[0]
    if m > MAX_ROWS:
        return f"the triton GEMV is for decode rows (M <= {MAX_ROWS}); got M={m}"
    return module.layout.tile_reason(16, "the triton 4-bit GEMV")


def _nf4_state(module: QuantizedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    scales = module.group_scales().float().contiguous()
    return scales, NF4_CODEBOOK.to(device=scales.device, dtype=torch.float32)


def operands(module: QuantizedLinear) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """What the Triton kernels take from ``module``: ``(FMT, scales, zeros, codebook, codes per row, groups, GROUP)``.

    ``FMT`` is 0 (int8), 1 (int4) or 2 (NF4); codes per row include the 4-bit padding; NF4 scales are
    double-dequantized once and cached. Tensors a format does not use are ``qweight`` (a valid pointer).
    """
    layout, dummy = module.layout, module.qweight
    if not layout.four_bit:
        return 0, module.scales, dummy, dummy, layout.in_features, 1, 1
    if layout.format == "int4":
        return 1, module.scales, module.zeros, dummy, layout.in_padded, layout.groups, layout.group
    s, lut = module.kernel_state("triton", _nf4_state)
    return 2, s, dummy, lut, layout.in_padded, layout.groups, layout.group


def triton_gemv(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out] in x.dtype
    """Dequantize-GEMV on the module's packed buffers, one program per (``BLOCK_N`` rows, activation row, K share)."""
    kernel = _kernel()
    x2 = x.reshape(-1, module.in_features).contiguous()
    m, n = x2.shape[0], module.out_features
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32)  # split-K programs add into it
    block_k = _block_k(module)
    code, s, z, lut, kp, groups, group = operands(module)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (n + meta["BLOCK_N"] - 1) // meta["BLOCK_N"], m, meta["SPLIT_K"]

    kernel[grid](x2, module.qweight, s, z, lut, y, n, module.in_features, kp, groups, m,
                 FMT=code, GROUP=group, BLOCK_K=block_k)  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


register_kernel(
    Kernel("triton", ("int8", "int4", "nf4"), ("cuda",), DTYPES, triton_gemv,
           "Triton dequantize-GEMV on the packed buffers (CUDA, M <= 16)", unavailable, _shape)
)  # fmt: skip
