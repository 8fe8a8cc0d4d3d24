"""``triton_mm``: a tile matmul that dequantizes each weight tile in registers (CUDA, fp16 / bf16, any M).

Between the GEMV (:mod:`.triton_gemv`, a few rows) and a dequantize pass plus cuBLAS (:mod:`.triton_dequant`,
prompts) lie decode batches of tens to hundreds of rows, where a 4-bit layer should cost less than its bf16
twin: the dequantize pass writes and re-reads the whole float weight every call (4x the packed bytes, twice)
before the matmul reads it again. Here, as in Marlin-class kernels, each program owns a ``[BLOCK_M, BLOCK_N]`` tile
of the output and walks K: it loads ``TILE_K`` packed codes of its ``BLOCK_N`` weight rows (:func:`tile_k`),
decodes them (int8: ``code``, scaled after the loop per row; int4: ``(code - zero) * scale``; NF4:
``codebook[code] * scale``, one scale a row and step, the step inside one group) into the activation dtype and feeds
them with the activation tile to ``tl.dot`` (tensor cores, fp32 accumulation). Each packed byte is read once per
``BLOCK_M`` rows of activations.

The 4-bit weight a tile multiplies is the reference's rounded to the activation dtype, as the dequantize pass writes
it (int8 codes are exact in it, the row scale applied to the fp32 sums), so results agree with ``x @ module.dequantize(dtype).T`` up to the order of the fp32 sums (the interpreter tests
check it on the CPU). The autotuner picks tile sizes per (rows bucket, N, K, format); ``kernel="auto"`` times this
kernel against the others on the GPU and keeps the fastest.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from ...protocol import QuantizedLinear
from ...triton_env import interpreted, unavailable
from .registry import Kernel, register_kernel
from .triton_gemv import operands

DTYPES = (torch.bfloat16, torch.float16)  # tensor-core dot inputs (fp32 activations: the other kernels)


def configs() -> list[tuple[int, int, int, int]]:
    """The autotuner's ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` candidates."""
    out = [(bm, bn, 4, 3) for bm in (16, 32, 64) for bn in (32, 64, 128)]
    return out + [(128, 128, 8, 3), (64, 128, 8, 4), (128, 64, 4, 4)]


@lru_cache(maxsize=1)
def _jit() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def mm(
        x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, y_ptr,
        M, N, K, KP, GROUPS, M_BUCKET,
        FMT: tl.constexpr, GROUP: tl.constexpr, TILE_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # FMT 0: int8 [N, K] with scales [N]; 1: int4 and 2: NF4, bytes [N, KP // 2] with scales (zeros) [N, GROUPS].
        # TILE_K: codes per K step (4-bit: a step lies inside one group; tile_k()).
        # M_BUCKET: the autotuner's key only (rows rounded up to a power of two).
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        steps = tl.cdiv(K if FMT == 0 else KP, TILE_K)
        for t in range(0, steps):
            k0 = t * TILE_K
            cols = k0 + tl.arange(0, TILE_K)  # [TILE_K]
            x = tl.load(x_ptr + rm[:, None] * K + cols[None, :], mask=m_ok[:, None] & (cols < K)[None, :], other=0.0)
            if FMT == 0:
                q = tl.load(w_ptr + rn[:, None] * K + cols[None, :], mask=n_ok[:, None] & (cols < K)[None, :], other=0)
                w = q.to(x.dtype)  # |code| <= 127: exact in fp16 and bf16; the row scale comes after the loop
            else:
                HALF: tl.constexpr = TILE_K // 2
                j = k0 // 2 + tl.arange(0, HALF)  # byte columns [HALF]
                b = tl.load(w_ptr + rn[:, None] * (KP // 2) + j[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
                lo = b & 15
                hi = (b >> 4) & 15
                g = k0 // GROUP  # the tile lies inside one group
                s = tl.load(s_ptr + rn * GROUPS + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]  # [BLOCK_N, 1]
                if FMT == 1:
                    z = tl.load(z_ptr + rn * GROUPS + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                    w_lo = (lo.to(tl.float32) - z) * s
                    w_hi = (hi.to(tl.float32) - z) * s
                else:
                    w_lo = tl.load(lut_ptr + lo) * s
                    w_hi = tl.load(lut_ptr + hi) * s
                w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, TILE_K)).to(x.dtype)  # element 2j, then 2j + 1
            acc += tl.dot(x, tl.trans(w))  # [BLOCK_M, BLOCK_N]
        if FMT == 0:
            acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return mm


@lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton

    candidates = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in configs()]
    if interpreted():
        candidates = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4)]
    return triton.autotune(configs=candidates, key=["M_BUCKET", "N", "K", "FMT"])(_jit())


def tile_k(module: QuantizedLinear, cap: int = 64) -> int:
    """Codes per K step: for 4-bit layers the largest power of two up to ``cap`` that divides the group (so a step
    lies inside one group), for int8 ``cap``; 0 when no step of at least 16 codes fits (``tl.dot``'s least K)."""
    layout = module.layout
    if not layout.four_bit:
        return cap
    tile = cap
    while tile >= 16 and layout.group % tile:
        tile //= 2
    return tile if tile >= 16 else 0


def _shape(module: QuantizedLinear, x: torch.Tensor) -> str | None:
    if tile_k(module) == 0:
        return f"kernel 'triton_mm' needs 4-bit groups divisible by 16; got {module.layout.group}"
    return None


def triton_mm(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out] in x.dtype
    """The quantized layer's matmul, each weight tile decoded in registers and multiplied on tensor cores."""
    x2 = x.reshape(-1, module.in_features).contiguous()  # [M, K]
    m, n = x2.shape[0], module.out_features
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)  # [M, N]
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    why = _shape(module, x)
    if why is not None:
        raise ValueError(why)
    code, s, z, lut, kp, groups, group = operands(module)

    def grid(meta: dict) -> tuple[int, int]:
        return (m + meta["BLOCK_M"] - 1) // meta["BLOCK_M"], (n + meta["BLOCK_N"] - 1) // meta["BLOCK_N"]

    bucket = 1 << max(m - 1, 0).bit_length()  # the autotuner's key: tiles tuned per rows bucket, not per M
    _kernel()[grid](x2, module.qweight, s, z, lut, y, m, n, module.in_features, kp, groups, bucket,
                    FMT=code, GROUP=group, TILE_K=tile_k(module))  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


register_kernel(
    Kernel("triton_mm", ("int8", "int4", "nf4"), ("cuda",), DTYPES, triton_mm,
           "Triton tile matmul decoding each weight tile in registers (CUDA, fp16/bf16, any M)", unavailable, _shape)
)  # fmt: skip
