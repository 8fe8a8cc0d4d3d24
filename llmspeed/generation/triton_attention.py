"""Paged decode attention in Triton: each sequence's keys and values read in place through its block table.

:class:`~.kv_cache.PagedAttention` on its own gathers every decode sequence's blocks into a padded
``[n, Hkv, W * BS, D]`` copy and runs one masked SDPA over it. On a GPU that copy is most of a
decode step's attention traffic: the gather writes and re-reads the padded context of all ``n``
sequences, in every layer, and the padding grows with the longest sequence of the batch. This kernel
reads the cache where it lies:

* one program per (sequence, KV head): it loads the ``G = H / Hkv`` query heads of that KV group
  (padded to 16 rows, the smallest ``tl.dot`` tile), then walks the sequence's own context,
  ``BLOCK_T`` tokens at a time, looking each token's block up in the block table;
* scores and the softmax-weighted values use ``tl.dot`` (on the cache's dtype, bf16/fp16 on tensor
  cores) with an online (streaming) softmax in fp32, so a token is read once and nothing is
  materialised per sequence;
* the loop stops at the sequence's length, so a short sequence costs what its context costs, however
  long the longest one is, and the kernel's launch shape depends only on ``n``: a CUDA graph
  captured for a batch size and a block-table width serves every shorter context.

``unavailable()`` says why it cannot run (no Triton, no CUDA device); :func:`probe` checks it once
per device against the gather + SDPA path before a :class:`~.engine.Generator` uses it. The tests run
it on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``), where the operands of ``tl.dot``
are widened to fp32 first (Triton 3.9's interpreter returns garbage for a bf16 ``tl.dot``), and
compile it to sm_90 and sm_80 machine code with Triton's own ``ptxas`` (``tests/test_triton_compile.py``).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

BLOCK_T = 64  # context tokens per loop iteration


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def unavailable(device: torch.device | str = "cuda") -> str | None:
    """Why the kernel cannot run on ``device``, or ``None``."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it ships with CUDA builds of torch)"
    if interpreted():
        return None
    if torch.device(device).type != "cuda":
        return f"the Triton paged attention runs on CUDA devices; got {torch.device(device).type}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr,
        WIDTH, scale,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
        BLOCK_T: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # q and out [n, HKV * G, D]; k and v [NB * BS, HKV, D]; table [n, WIDTH]; lens [n]
        n = tl.program_id(0)
        h = tl.program_id(1)
        length = tl.load(lens_ptr + n).to(tl.int32)
        g = tl.arange(0, G_PAD)  # [G_PAD]
        d = tl.arange(0, D)  # [D]
        heads = h * G + g
        q = tl.load(q_ptr + (n * HKV * G + heads)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
        q = q.to(tl.float32) * scale
        if not UPCAST:
            q = q.to(k_ptr.dtype.element_ty)  # [G_PAD, D]
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        for t0 in range(0, length, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T] positions
            ok = t < length
            block = tl.load(table_ptr + n * WIDTH + t // BS, mask=ok, other=0).to(tl.int64)
            offset = ((block * BS + t % BS) * HKV + h) * D  # [BLOCK_T]
            k = tl.load(k_ptr + offset[:, None] + d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_T, D]
            v = tl.load(v_ptr + offset[:, None] + d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_T, D]
            if UPCAST:  # the interpreter's tl.dot mishandles bf16 operands
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [G_PAD, BLOCK_T]
            else:
                s = tl.dot(q, tl.trans(k))  # [G_PAD, BLOCK_T]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [G_PAD]
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])  # [G_PAD, BLOCK_T]
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")  # [G_PAD, D]
            else:
                pv = tl.dot(p.to(v.dtype), v)  # [G_PAD, D]
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + (n * HKV * G + heads)[:, None] * D + d[None, :], out, mask=(g < G)[:, None])

    return paged_decode


def paged_decode(
    query: torch.Tensor,  # [n, H, D]
    key_cache: torch.Tensor,  # [NB, BS, Hkv, D]
    value_cache: torch.Tensor,  # [NB, BS, Hkv, D]
    tables: torch.Tensor,  # [n, W] block ids (int32 or int64)
    lens: torch.Tensor,  # [n] context lengths, the new token included (each >= 1)
    scale: float,
) -> torch.Tensor:  # [n, H, D] in query.dtype
    """Attention of one new token per sequence over its paged context (see the module docstring)."""
    n, heads, dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    group = heads // kv_heads
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton paged attention; got {dim}")
    out = torch.empty(n, heads, dim, device=query.device, dtype=torch.float32)  # [n, H, D]
    q = query.to(key_cache.dtype).contiguous()
    g_pad = max(16, 1 << (group - 1).bit_length())
    _kernel()[(n, kv_heads)](
        q, key_cache, value_cache, tables.contiguous(), lens.contiguous(), out, tables.shape[1], float(scale),
        HKV=kv_heads, G=group, G_PAD=g_pad, D=dim, BS=block_size, BLOCK_T=BLOCK_T,
        IEEE=key_cache.dtype == torch.float32 or interpreted(), UPCAST=interpreted(),
    )  # fmt: skip
    return out.to(query.dtype)


def reference(
    query: torch.Tensor,  # [n, H, D]
    key_cache: torch.Tensor,  # [NB, BS, Hkv, D]
    value_cache: torch.Tensor,  # [NB, BS, Hkv, D]
    tables: torch.Tensor,  # [n, W]
    lens: torch.Tensor,  # [n]
    scale: float,
) -> torch.Tensor:  # [n, H, D]
    """The same attention as gather + masked SDPA (what :class:`~.kv_cache.PagedAttention` does without the kernel)."""
    n, heads, dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    width = tables.shape[1]
    k = key_cache[tables.long()].reshape(n, width * block_size, kv_heads, dim).transpose(1, 2)  # [n, Hkv, L, D]
    v = value_cache[tables.long()].reshape(n, width * block_size, kv_heads, dim).transpose(1, 2)  # [n, Hkv, L, D]
    mask = torch.arange(width * block_size, device=query.device)[None, :] < lens[:, None]  # [n, L]
    q = query.reshape(n, kv_heads, heads // kv_heads, dim)  # [n, Hkv, G, D]
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None], scale=scale)
    return out.reshape(n, heads, dim)


_PROBED: dict[str, str | None] = {}


def probe(device: torch.device, dtype: torch.dtype, kv_heads: int, heads: int, dim: int) -> str | None:
    """Run the kernel once on random data of these shapes; ``None`` if it matches :func:`reference`, else why not.

    The answer is cached per device, dtype and shape, so a :class:`~.engine.Generator` pays it once.
    """
    key = f"{device}|{dtype}|{kv_heads}|{heads}|{dim}"
    if key in _PROBED:
        return _PROBED[key]
    why = unavailable(device)
    if why is None:
        try:
            gen = torch.Generator().manual_seed(0)
            block_size, blocks, n = 16, 24, 3
            shape = (blocks, block_size, kv_heads, dim)
            kc = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)  # [NB, BS, Hkv, D]
            vc = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)  # [NB, BS, Hkv, D]
            q = torch.randn(n, heads, dim, generator=gen).to(device=device, dtype=dtype)  # [n, H, D]
            tables = torch.randperm(blocks, generator=gen)[: n * 8].view(n, 8).to(device)  # [n, 8]
            lens = torch.tensor([1, 70, 128], device=device)  # [n]
            got = paged_decode(q, kc, vc, tables, lens, dim**-0.5).float()
            want = reference(q, kc, vc, tables, lens, dim**-0.5).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            if not err <= tol:
                why = f"the Triton paged attention disagrees with SDPA: relative error {err:.2e} > {tol:.0e}"
        except Exception as exc:  # noqa: BLE001 - a kernel that fails to build or run is simply not used
            why = f"the Triton paged attention failed to run: {type(exc).__name__}: {exc}"
    _PROBED[key] = why
    return why


__all__ = ["BLOCK_T", "paged_decode", "probe", "reference", "unavailable"]
