"""The paged KV cache tensors and the attention backend that reads and writes them.

Layout: per layer, keys and values are ``[num_blocks, block_size, num_kv_heads, head_dim]``; a
sequence owns a list of blocks (its block table, see :mod:`.block_manager`). Each step the
engine builds one :class:`PagedAttention` from the step's chunks; the model calls it once per
layer with the new tokens' rotated q/k/v. It writes the new keys/values into their slots, then

* runs all single-token chunks (decodes) as **one** batched SDPA call over their gathered blocks,
  padded to the longest context and masked; grouped-query attention is handled without copying
  keys by folding the query heads of a KV group into the query-length axis
  (``q[n, Hkv, G, D]`` against ``k[n, Hkv, L, D]``);
* runs all longer chunks (prefill) as one more SDPA call: queries padded to the longest chunk,
  keys gathered to the longest context, an offset causal mask per chunk (a lone chunk starting at
  position 0 attends causally to its own new keys, with no gather). On CUDA the gathered keys are
  expanded to every query head first: SDPA there runs masked grouped-query attention only on its
  unfused math backend.

All index tensors are built once per step, not per layer. On CUDA a ``decode_kernel`` and a
``prefill_kernel`` (:mod:`.triton_attention`) can replace the gathers + SDPA, reading each sequence's
blocks in place. See ``docs/batching.md`` for the
measurements behind this layout (block gather + SDPA vs. alternatives on this CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F

from ..names import CANONICAL_DTYPES, dtype_name
from ..protocol import ModelSpec
from .block_manager import slot

KV_CACHE_DTYPES = ("auto", "fp32", "bf16", "fp16")


def cache_dtype(spec: ModelSpec, wanted: str | torch.dtype) -> torch.dtype:
    """The dtype of a KV cache for ``wanted`` (``"auto"``: the model's; else any spelling of fp32/bf16/fp16).

    A dtype other than the model's is for the CPU, whose attention kernels widen bf16 and fp16 rows in
    registers (half the bytes a decode step reads from the cache); ``ValueError`` elsewhere, and for a
    value that names no dtype.
    """
    name = "auto" if isinstance(wanted, str) and wanted.strip().lower() == "auto" else dtype_name(wanted)
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)} (or another spelling: "
                         f"'float16', torch.bfloat16, ...); got {wanted!r}")  # fmt: skip
    dtype = spec.dtype if name == "auto" else CANONICAL_DTYPES[str(name)]
    if dtype != spec.dtype and spec.device.type != "cpu":
        raise ValueError(f"kv_cache_dtype={wanted!r} differs from the model's {spec.dtype}; on {spec.device.type} the "
                         f"attention kernels and CUDA graphs read the model's dtype: use 'auto'")  # fmt: skip
    return dtype


def weights_key(root: torch.nn.Module) -> int:
    """A hash of ``root``'s modules and of every parameter's and buffer's storage, dtype, device and version: what
    cached keys and values depend on besides the tokens. It changes when the model is quantized, cast, prepared for
    QAT, its weights are loaded or edited in place, adapters merged; not on writes through ``tensor.data``, which
    bump no version."""
    tensors = (*root.parameters(), *root.buffers())
    return hash((tuple(map(id, root.modules())),
                 tuple((t.data_ptr(), t.dtype, t.device, 0 if t.is_inference() else t._version) for t in tensors)))


def _check_fp16_range(key: torch.Tensor, value: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """``ValueError`` (before anything is written) when rounding ``key``/``value`` to an fp16 cache gave an inf:
    every score or output reading it would be NaN (the fused step's write refuses the same values)."""
    if k_new.isinf().any() or v_new.isinf().any():
        big = max(key.abs().max().item(), value.abs().max().item())
        raise ValueError(f"kv_cache_dtype='fp16' cannot hold a key or value of magnitude {big:g} (fp16's largest is "
                         f"65504; it would be stored as inf): use kv_cache_dtype='bf16' or 'fp32'")  # fmt: skip


class PagedKVCache:
    """Preallocated key/value blocks for every layer.

    Args:
        spec: The model's shapes (layers, KV heads, head dim, dtype, device).
        num_blocks: Blocks per layer.
        block_size: Tokens per block.
        dtype: Dtype of the cached keys and values (default: the model's).
    """

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        shape = (spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        dtype = spec.dtype if dtype is None else dtype
        self.key = torch.zeros(shape, dtype=dtype, device=spec.device)  # [L, NB, BS, Hkv, D]
        self.value = torch.zeros(shape, dtype=dtype, device=spec.device)  # [L, NB, BS, Hkv, D]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value tensors."""
        return self.key.nbytes + self.value.nbytes


def block_tables(
    tables: Sequence[Sequence[int]], width: int, device: torch.device, pad: int = 0, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """Block tables cut or padded with block ``pad`` to ``width`` columns: ``[len(tables), width]``."""
    rows = [list(t[:width]) + [pad] * (width - min(len(t), width)) for t in tables]
    return torch.tensor(rows, dtype=dtype, device=device).reshape(len(tables), width)


def cu_seq(lengths: Sequence[int], device: torch.device) -> torch.Tensor:  # [m + 1] int32
    """Packed chunks' boundaries, as varlen kernels take them: ``[0, n0, n0 + n1, ...]``."""
    return torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)


@dataclass(frozen=True)
class PrefillKernel:
    """A prefill attention that reads the paged cache in place (e.g. :data:`.triton_attention.TRITON_PREFILL`).

    Attributes:
        plan: ``plan(chunks, block_size, device)`` with chunks ``(block_table, start, length, first_row)``;
            built once per step.
        run: ``run(query [T, H, D], key [NB, BS, Hkv, D], value [NB, BS, Hkv, D], plan, scale, out [T, H, D])``
            writes the chunks' rows of ``out``; called once per layer.
    """

    plan: Callable[[Sequence[tuple[Sequence[int], int, int, int]], int, torch.device], Any]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, float, torch.Tensor], None]


DecodeKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]  # (q [n, H, D], key [NB, BS, Hkv, D], value [NB, BS, Hkv, D], tables [n, W], lens [n], scale) -> [n, H, D]

FreshKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float, torch.Tensor], None
]  # (q [T, H, D], k [T, Hkv, D], v [T, Hkv, D], cu_seq [m + 1] int32, longest, scale, out [T, H, D]): packed causal


class PagedAttention:
    """One step's :class:`~llmspeed.protocol.AttentionBackend` over a :class:`PagedKVCache`.

    Args:
        cache: The cache to write to and read from.
        chunks: ``(block_table, start, length)`` per sequence, in flat-batch order, all
            single-token chunks first; block tables must already cover ``start + length`` tokens.
        slots: The cache slot of every token, when the caller has them (else computed from ``chunks``).
        decode_kernel: Runs the single-token chunks instead of gather + SDPA, reading the blocks in
            place (e.g. :func:`.triton_attention.paged_decode` on CUDA).
        prefill_kernel: Runs the longer chunks instead of gather + masked SDPA (a lone chunk from
            position 0 still uses SDPA's causal kernel, which needs no cache read).
        fresh_kernel: Runs the longer chunks when every one starts its sequence (position 0) and there are
            several, over their own keys and values, packed (e.g. :func:`.varlen_attention.fresh_prefill` on CUDA).
    """

    def __init__(
        self,
        cache: PagedKVCache,
        chunks: Sequence[tuple[Sequence[int], int, int]],
        decode_kernel: DecodeKernel | None = None,
        prefill_kernel: PrefillKernel | None = None,
        slots: Sequence[int] | None = None,
        fresh_kernel: FreshKernel | None = None,
    ):
        self.cache = cache
        self.decode_kernel = decode_kernel
        self.prefill_kernel = prefill_kernel
        device = cache.key.device
        bs = cache.block_size
        if slots is None:
            slots = [slot(table, pos, bs) for table, start, length in chunks for pos in range(start, start + length)]
        self.slots = torch.tensor(list(slots), dtype=torch.long, device=device)  # [T]
        self.num_tokens = len(slots)

        decodes = [c for c in chunks if c[2] == 1]
        self.num_decode = len(decodes)
        if decodes:
            self._plan_decodes(decodes, device)
        prefills = list(chunks[self.num_decode :])
        self.num_prefill = len(prefills)
        # CUDA's SDPA runs grouped-query attention with a mask only on its unfused math backend (fp32
        # scores of [m, H, tq, L]); with keys expanded to every query head, its memory-efficient kernel runs
        self.expand_gqa = device.type == "cuda"
        self.causal_only = self.num_prefill == 1 and prefills[0][1] == 0  # one chunk from position 0: no gather
        self.fresh: tuple[FreshKernel, torch.Tensor, int] | None = None  # chunks that all start their sequences
        if fresh_kernel is not None and self.num_prefill > 1 and all(s == 0 for _, s, _ in prefills):
            lengths = [n for _, _, n in prefills]
            self.fresh = (fresh_kernel, cu_seq(lengths, device), max(lengths))
        elif prefills and not self.causal_only and prefill_kernel is not None:
            rows = accumulate([n for _, _, n in prefills], initial=self.num_decode)  # each chunk's first row
            self.pre_plan = prefill_kernel.plan([(t, s, n, r) for (t, s, n), r in zip(prefills, rows)], bs, device)
        elif prefills and not self.causal_only:
            self._plan_prefills(prefills, device)

    def _plan_decodes(self, decodes: Sequence[tuple[Sequence[int], int, int]], device: torch.device) -> None:
        """Block index and lengths of the single-token chunks (and their padding mask, without a kernel)."""
        bs = self.cache.block_size
        ctx = [start + 1 for _, start, _ in decodes]
        width = -(-max(ctx) // bs)
        self.dec_blocks = block_tables([t for t, _, _ in decodes], width, device).flatten()  # [n * W]
        self.dec_lens = torch.tensor(ctx, device=device)  # [n]
        if self.decode_kernel is None:
            pos = torch.arange(width * bs, device=device)  # [W * BS]
            self.dec_mask: torch.Tensor | None = (pos[None, :] < self.dec_lens[:, None])[:, None, None, :]  # [n, 1, 1, W * BS]

    def _plan_prefills(self, prefills: Sequence[tuple[Sequence[int], int, int]], device: torch.device) -> None:
        """Gather index, padded query rows and offset causal mask of the longer chunks, for one masked SDPA."""
        bs = self.cache.block_size
        lens = torch.tensor([n for _, _, n in prefills], device=device)  # [m]
        starts = torch.tensor([s for _, s, _ in prefills], device=device)  # [m]
        tq = int(max(n for _, _, n in prefills))
        width = -(-max(s + n for _, s, n in prefills) // bs)
        self.pre_blocks = block_tables([t for t, _, _ in prefills], width, device).flatten()  # [m * W]
        i = torch.arange(tq, device=device)  # [tq]
        # padded query rows repeat the chunk's last token (valid mask, output discarded)
        last = torch.minimum(i[None, :], lens[:, None] - 1)  # [m, tq]
        q_pos = starts[:, None] + last  # [m, tq]
        k_pos = torch.arange(width * bs, device=device)  # [W * BS]
        self.pre_mask = (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [m, 1, tq, W * BS]
        first_row = torch.cumsum(lens, 0) - lens + self.num_decode  # [m]
        self.pre_rows = (first_row[:, None] + last).flatten()  # [m * tq] rows of the flat batch
        keep = (i[None, :] < lens[:, None]).flatten()  # [m * tq]
        self.pre_keep = keep.nonzero().flatten()  # [sum(lens)]
        self.pre_shape = (len(prefills), tq)

    @classmethod
    def static_decode(
        cls,
        cache: PagedKVCache,
        slots: torch.Tensor,  # [n]
        blocks: torch.Tensor,  # [n * W]
        lens: torch.Tensor,  # [n]
        mask: torch.Tensor | None,  # [n, 1, 1, W * BS]; None with a decode kernel
        decode_kernel: DecodeKernel | None = None,
    ) -> PagedAttention:
        """A decode-only backend over caller-owned index tensors (updated in place between CUDA graph replays)."""
        self = cls.__new__(cls)
        self.cache = cache
        self.decode_kernel = decode_kernel
        self.prefill_kernel = None
        self.slots = slots
        self.num_tokens = self.num_decode = slots.shape[0]
        self.dec_blocks = blocks
        self.dec_lens = lens
        self.dec_mask = mask
        self.num_prefill = 0
        self.causal_only = False
        self.fresh = None
        self.expand_gqa = False
        return self

    def __call__(
        self,
        layer_idx: int,
        query: torch.Tensor,  # [1, H, T, D]
        key: torch.Tensor,  # [1, Hkv, T, D]
        value: torch.Tensor,  # [1, Hkv, T, D]
        scaling: float,
    ) -> torch.Tensor:  # [1, T, H, D]
        cache = self.cache
        _, heads, tokens, dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        k_layer = cache.key[layer_idx]  # [NB, BS, Hkv, D]
        v_layer = cache.value[layer_idx]  # [NB, BS, Hkv, D]
        k_new = key[0].transpose(0, 1).to(k_layer.dtype)  # [T, Hkv, D]
        v_new = value[0].transpose(0, 1).to(v_layer.dtype)  # [T, Hkv, D]
        if k_layer.dtype == torch.float16 and key.dtype != torch.float16:
            _check_fp16_range(key, value, k_new, v_new)
        k_layer.view(-1, kv_heads, dim).index_copy_(0, self.slots, k_new)
        v_layer.view(-1, kv_heads, dim).index_copy_(0, self.slots, v_new)

        out = query.new_empty(tokens, heads, dim)  # [T, H, D]
        if self.num_decode and self.decode_kernel is not None:
            n = self.num_decode
            tables = self.dec_blocks.view(n, -1)  # [n, W]
            q = query[0, :, :n].transpose(0, 1)  # [n, H, D]
            out[:n] = self.decode_kernel(q, k_layer, v_layer, tables, self.dec_lens, scaling)  # [n, H, D]
        elif self.num_decode:
            n = self.num_decode
            q = query[0, :, :n].reshape(kv_heads, group, n, dim).permute(2, 0, 1, 3)  # [n, Hkv, G, D]
            k = k_layer.index_select(0, self.dec_blocks).view(n, -1, kv_heads, dim).transpose(1, 2)  # [n, Hkv, L, D]
            v = v_layer.index_select(0, self.dec_blocks).view(n, -1, kv_heads, dim).transpose(1, 2)  # [n, Hkv, L, D]
            att = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=self.dec_mask, scale=scaling)
            out[:n] = att.reshape(n, heads, dim)  # [n, H, D]
        if self.fresh is not None:  # the chunks' own keys and values, packed: no cache read, no padding
            row = self.num_decode
            kernel, cu, longest = self.fresh
            kernel(query[0, :, row:].transpose(0, 1), key[0, :, row:].transpose(0, 1), value[0, :, row:].transpose(0, 1),
                   cu, longest, scaling, out[row:])  # fmt: skip
        elif self.causal_only:
            row = self.num_decode
            att = F.scaled_dot_product_attention(
                query[:, :, row:], key[:, :, row:], value[:, :, row:], is_causal=True, scale=scaling, enable_gqa=True
            )  # [1, H, t, D]
            out[row:] = att[0].transpose(0, 1)  # [t, H, D]
        elif self.num_prefill and self.prefill_kernel is not None:
            self.prefill_kernel.run(query[0].transpose(0, 1), k_layer, v_layer, self.pre_plan, scaling, out)
        elif self.num_prefill:
            m, tq = self.pre_shape
            q = query[0].index_select(1, self.pre_rows).view(heads, m, tq, dim).transpose(0, 1)  # [m, H, tq, D]
            k = k_layer.index_select(0, self.pre_blocks).view(m, -1, kv_heads, dim).transpose(1, 2)  # [m, Hkv, L, D]
            v = v_layer.index_select(0, self.pre_blocks).view(m, -1, kv_heads, dim).transpose(1, 2)  # [m, Hkv, L, D]
            k, v = k.to(q.dtype), v.to(q.dtype)
            if self.expand_gqa and group > 1:
                k = k.repeat_interleave(group, dim=1)  # [m, H, L, D]
                v = v.repeat_interleave(group, dim=1)  # [m, H, L, D]
            att = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.pre_mask, scale=scaling, enable_gqa=not self.expand_gqa
            )  # [m, H, tq, D]
            att = att.transpose(1, 2).reshape(m * tq, heads, dim)  # [m * tq, H, D]
            out[self.num_decode :] = att.index_select(0, self.pre_keep)  # [sum(lens), H, D]
        return out[None]  # [1, T, H, D]
