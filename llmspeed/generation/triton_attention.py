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

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from ..triton_env import interpreted, unavailable
from .kv_cache import PrefillKernel, block_tables

BLOCK_T = 64  # context tokens per loop iteration
BLOCK_Q = 64  # queries of one chunk per prefill program


@lru_cache(maxsize=1)
def _kernels() -> Any:
    """The kernels module (:mod:`.triton_kernels`: ``paged_decode``, ``paged_prefill``), imported on first use."""
    from . import triton_kernels

    return triton_kernels


def _check(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor | None = None
) -> None:
    """``ValueError`` for operands the kernels would misread: they index dense ``[NB, BS, Hkv, D]`` caches
    (and a dense ``out``) and run ``H / Hkv`` query heads per KV head."""
    dim = query.shape[-1]
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton paged attention; got {dim}")
    heads, kv_heads = query.shape[-2], key_cache.shape[2]
    if heads % kv_heads or key_cache.shape[3] != dim or value_cache.shape != key_cache.shape:
        raise ValueError(
            f"the Triton paged attention needs query [.., H, D] and equal caches [NB, BS, Hkv, D] with H a multiple "
            f"of Hkv; got query {tuple(query.shape)}, key_cache {tuple(key_cache.shape)}, "
            f"value_cache {tuple(value_cache.shape)}"
        )
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache), ("out", out)):
        if t is not None and not t.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous for the Triton paged attention (it is indexed as a dense tensor); "
                f"got shape {tuple(t.shape)} with strides {t.stride()}"
            )


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
    _check(query, key_cache, value_cache)
    out = torch.empty(n, heads, dim, device=query.device, dtype=torch.float32)  # [n, H, D]
    q = query.to(key_cache.dtype).contiguous()
    g_pad = max(16, 1 << (group - 1).bit_length())
    _kernels().paged_decode[(n, kv_heads)](
        q, key_cache, value_cache, tables.contiguous(), lens.contiguous(), out, tables.shape[1], float(scale),
        HKV=kv_heads, G=group, G_PAD=g_pad, D=dim, BS=block_size, BLOCK_T=BLOCK_T,
        IEEE=key_cache.dtype == torch.float32 or interpreted(), UPCAST=interpreted(),
    )  # fmt: skip
    return out.to(query.dtype)


@dataclass(frozen=True)
class PrefillPlan:
    """One step's prefill chunks as the prefill kernel reads them (built once per step, used by every layer).

    Attributes:
        tables: Block table of each chunk's sequence, padded: ``[m, W]``.
        rows: Row of each chunk's first query in the step's flat batch: ``[m]``.
        starts: Position of each chunk's first query: ``[m]``.
        lens: Queries per chunk: ``[m]``.
        tile_chunk: Chunk of each work tile (``BLOCK_Q`` queries): ``[tiles]``.
        tile_first: First query of each tile within its chunk: ``[tiles]``.
    """

    tables: torch.Tensor
    rows: torch.Tensor
    starts: torch.Tensor
    lens: torch.Tensor
    tile_chunk: torch.Tensor
    tile_first: torch.Tensor


def prefill_plan(chunks: Sequence[tuple[Sequence[int], int, int, int]], block_size: int, device: torch.device) -> PrefillPlan:
    """Plan for chunks ``(block_table, start, length, first_row)``; tables must cover ``start + length``."""
    width = max(-(-(start + length) // block_size) for _, start, length, _ in chunks)
    tiles = [(c, first) for c, (_, _, length, _) in enumerate(chunks) for first in range(0, length, BLOCK_Q)]
    host = torch.tensor(
        [[row for *_, row in chunks], [s for _, s, _, _ in chunks], [n for _, _, n, _ in chunks]], dtype=torch.int32
    )  # [3, m]
    tile = torch.tensor([[c for c, _ in tiles], [first for _, first in tiles]], dtype=torch.int32)  # [2, tiles]
    tables = block_tables([t for t, *_ in chunks], width, device, dtype=torch.int32)  # [m, W]
    return PrefillPlan(tables, *host.to(device), *tile.to(device))


def paged_prefill(
    query: torch.Tensor,  # [T, H, D], the step's flat batch
    key_cache: torch.Tensor,  # [NB, BS, Hkv, D], the chunks' own keys already written
    value_cache: torch.Tensor,  # [NB, BS, Hkv, D]
    plan: PrefillPlan,
    scale: float,
    out: torch.Tensor,  # [T, H, D]: the chunks' rows are written, other rows left as they are
) -> None:
    """Causal attention of every prefill chunk's queries over its sequence's paged context, in place in ``out``."""
    _, heads, dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    _check(query, key_cache, value_cache, out)
    q = query.to(key_cache.dtype).contiguous()
    grid = (plan.tile_chunk.shape[0], heads)
    _kernels().paged_prefill[grid](
        q, key_cache, value_cache, plan.tables, out, plan.tile_chunk, plan.tile_first, plan.rows, plan.starts,
        plan.lens, plan.tables.shape[1], float(scale),
        H=heads, HKV=kv_heads, D=dim, BS=block_size, BLOCK_Q=BLOCK_Q, BLOCK_T=BLOCK_T,
        IEEE=key_cache.dtype == torch.float32 or interpreted(), UPCAST=interpreted(),
    )  # fmt: skip


def prefill_reference(
    query: torch.Tensor,  # [T, H, D]
    key_cache: torch.Tensor,  # [NB, BS, Hkv, D]
    value_cache: torch.Tensor,  # [NB, BS, Hkv, D]
    plan: PrefillPlan,
    scale: float,
    out: torch.Tensor,  # [T, H, D]
) -> None:
    """:func:`paged_prefill` in plain torch, one SDPA per chunk over its gathered context (tests and probe)."""
    _, heads, dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    for table, row, start, length in zip(plan.tables, plan.rows.tolist(), plan.starts.tolist(), plan.lens.tolist()):
        end = start + length
        k = key_cache[table.long()].reshape(-1, kv_heads, dim)[:end].transpose(0, 1)  # [Hkv, end, D]
        v = value_cache[table.long()].reshape(-1, kv_heads, dim)[:end].transpose(0, 1)  # [Hkv, end, D]
        q = query[row : row + length].transpose(0, 1)  # [H, length, D]
        mask = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        att = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=True
        )  # [H, length, D]
        out[row : row + length] = att.transpose(0, 1)


TRITON_PREFILL = PrefillKernel(prefill_plan, paged_prefill)  # the kernel, for PagedAttention
REFERENCE_PREFILL = PrefillKernel(prefill_plan, prefill_reference)  # the same in plain torch (tests)


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


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def probe(device: torch.device, dtype: torch.dtype, kv_heads: int, heads: int, dim: int) -> str | None:
    """Run both kernels once on random data of these shapes; ``None`` if they match the references, else why not.

    Decode rows are compared with :func:`reference` (gather + SDPA), prefill chunks (one from position
    0, one continuing a cached prefix, one longer than a tile) with :func:`prefill_reference`. The
    answer is cached per device, dtype and shape, so a :class:`~.engine.Generator` pays it once.
    """
    key = f"{device}|{dtype}|{kv_heads}|{heads}|{dim}"
    if key in _PROBED:
        return _PROBED[key]
    why = unavailable(device)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if why is None:
        try:
            gen = torch.Generator().manual_seed(0)
            block_size, blocks, n = 16, 24, 3
            shape = (blocks, block_size, kv_heads, dim)
            kc = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)  # [NB, BS, Hkv, D]
            vc = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)  # [NB, BS, Hkv, D]
            q = torch.randn(n, heads, dim, generator=gen).to(device=device, dtype=dtype)  # [n, H, D]
            order = torch.randperm(blocks, generator=gen)  # [NB]
            tables = order[: n * 8].view(n, 8).to(device)  # [n, 8]
            lens = torch.tensor([1, 70, 128], device=device)  # [n]
            err = _relative_error(paged_decode(q, kc, vc, tables, lens, dim**-0.5), reference(q, kc, vc, tables, lens, dim**-0.5))
            if not err <= tol:
                why = f"the Triton paged decode attention disagrees with SDPA: relative error {err:.2e} > {tol:.0e}"
            else:
                spans = [(0, 20), (40, 30), (0, 100)]  # (start, length) per chunk, after 2 decode rows
                chunks = [(order[8 * i : 8 * i + 8].tolist(), s, m, 2 + sum(x for _, x in spans[:i])) for i, (s, m) in enumerate(spans)]
                plan = prefill_plan(chunks, block_size, torch.device(device))
                q = torch.randn(152, heads, dim, generator=gen).to(device=device, dtype=dtype)  # [T, H, D]
                got, want = torch.zeros_like(q), torch.zeros_like(q)
                paged_prefill(q, kc, vc, plan, dim**-0.5, got)
                prefill_reference(q, kc, vc, plan, dim**-0.5, want)
                err = _relative_error(got, want)
                if not err <= tol:
                    why = f"the Triton paged prefill attention disagrees with SDPA: relative error {err:.2e} > {tol:.0e}"
        except Exception as exc:  # noqa: BLE001 - a kernel that fails to build or run is simply not used
            why = f"the Triton paged attention failed to run: {type(exc).__name__}: {exc}"
    _PROBED[key] = why
    return why


__all__ = [
    "BLOCK_Q",
    "BLOCK_T",
    "PrefillPlan",
    "REFERENCE_PREFILL",
    "TRITON_PREFILL",
    "paged_decode",
    "paged_prefill",
    "prefill_plan",
    "prefill_reference",
    "probe",
    "reference",
    "unavailable",
]
