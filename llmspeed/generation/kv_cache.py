"""The paged KV cache tensors and the attention backend that reads and writes them.

Layout: per layer, keys and values are ``[num_blocks, block_size, num_kv_heads, head_dim]``; a
sequence owns a list of blocks (its block table, see :mod:`.block_manager`). Each step the
engine builds one :class:`PagedAttention` from the step's chunks; the model calls it once per
layer with the new tokens' rotated q/k/v. It writes the new keys/values into their slots, then

* runs all single-token chunks (decodes) as **one** batched SDPA call over their gathered blocks,
  padded to the longest context and masked; grouped-query attention is handled without copying
  keys by folding the query heads of a KV group into the query-length axis
  (``q[n, Hkv, G, D]`` against ``k[n, Hkv, L, D]``);
* runs each longer chunk (prefill) with its own SDPA call: causal over its new tokens when it
  starts at position 0, otherwise over its gathered cached context with an offset causal mask.

All index tensors are built once per step, not per layer. See ``docs/batching.md`` for the
measurements behind this layout (block gather + SDPA vs. alternatives on this CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..protocol import ModelSpec


class PagedKVCache:
    """Preallocated key/value blocks for every layer.

    Args:
        spec: The model's shapes (layers, KV heads, head dim, dtype, device).
        num_blocks: Blocks per layer.
        block_size: Tokens per block.
    """

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        shape = (spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.key = torch.zeros(shape, dtype=spec.dtype, device=spec.device)  # [L, NB, BS, Hkv, D]
        self.value = torch.zeros(shape, dtype=spec.dtype, device=spec.device)  # [L, NB, BS, Hkv, D]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value tensors."""
        return self.key.nbytes + self.value.nbytes


def _block_index(tables: Sequence[Sequence[int]], width: int, device: torch.device) -> torch.Tensor:
    """Block tables padded with block 0 to ``width`` columns, flattened: ``[len(tables) * width]``."""
    rows = [list(t[:width]) + [0] * (width - min(len(t), width)) for t in tables]
    return torch.tensor(rows, dtype=torch.long, device=device).flatten()


class PagedAttention:
    """One step's :class:`~llmspeed.protocol.AttentionBackend` over a :class:`PagedKVCache`.

    Args:
        cache: The cache to write to and read from.
        chunks: ``(block_table, start, length)`` per sequence, in flat-batch order, all
            single-token chunks first; block tables must already cover ``start + length`` tokens.
    """

    def __init__(self, cache: PagedKVCache, chunks: Sequence[tuple[Sequence[int], int, int]]):
        self.cache = cache
        device = cache.key.device
        bs = cache.block_size
        slots: list[int] = []
        for table, start, length in chunks:
            for pos in range(start, start + length):
                slots.append(table[pos // bs] * bs + pos % bs)
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)  # [T]
        self.num_tokens = len(slots)

        decodes = [c for c in chunks if c[2] == 1]
        self.num_decode = len(decodes)
        if decodes:
            ctx = [start + 1 for _, start, _ in decodes]
            width = -(-max(ctx) // bs)
            self.dec_blocks = _block_index([t for t, _, _ in decodes], width, device)  # [n * W]
            pos = torch.arange(width * bs, device=device)  # [W * BS]
            lens = torch.tensor(ctx, device=device)  # [n]
            self.dec_mask = (pos[None, :] < lens[:, None])[:, None, None, :]  # [n, 1, 1, W * BS]

        self.prefills: list[tuple[int, int, int, torch.Tensor | None, torch.Tensor | None]] = []
        row = self.num_decode
        for table, start, length in chunks[self.num_decode :]:
            blocks = mask = None
            if start > 0:
                ctx = start + length
                blocks = _block_index([table], -(-ctx // bs), device)  # [W]
                q_pos = torch.arange(start, ctx, device=device)  # [length]
                k_pos = torch.arange(ctx, device=device)  # [ctx]
                mask = k_pos[None, :] <= q_pos[:, None]  # [length, ctx]
            self.prefills.append((row, length, start, blocks, mask))
            row += length

    @classmethod
    def static_decode(
        cls,
        cache: PagedKVCache,
        slots: torch.Tensor,  # [n]
        blocks: torch.Tensor,  # [n * W]
        mask: torch.Tensor,  # [n, 1, 1, W * BS]
    ) -> PagedAttention:
        """A decode-only backend over caller-owned index tensors (updated in place between CUDA graph replays)."""
        self = cls.__new__(cls)
        self.cache = cache
        self.slots = slots
        self.num_tokens = self.num_decode = slots.shape[0]
        self.dec_blocks = blocks
        self.dec_mask = mask
        self.prefills = []
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
        k_layer.view(-1, kv_heads, dim).index_copy_(0, self.slots, k_new)
        v_layer.view(-1, kv_heads, dim).index_copy_(0, self.slots, v_new)

        out = query.new_empty(tokens, heads, dim)  # [T, H, D]
        if self.num_decode:
            n = self.num_decode
            q = query[0, :, :n].reshape(kv_heads, group, n, dim).permute(2, 0, 1, 3)  # [n, Hkv, G, D]
            k = k_layer.index_select(0, self.dec_blocks).view(n, -1, kv_heads, dim).transpose(1, 2)  # [n, Hkv, L, D]
            v = v_layer.index_select(0, self.dec_blocks).view(n, -1, kv_heads, dim).transpose(1, 2)  # [n, Hkv, L, D]
            att = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=self.dec_mask, scale=scaling)
            out[:n] = att.reshape(n, heads, dim)  # [n, H, D]
        for row, length, start, blocks, mask in self.prefills:
            q = query[:, :, row : row + length]  # [1, H, t, D]
            if blocks is None:
                k = key[:, :, row : row + length]  # [1, Hkv, t, D]
                v = value[:, :, row : row + length]  # [1, Hkv, t, D]
                att = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
            else:
                ctx = mask.shape[1]
                k = k_layer.index_select(0, blocks).view(-1, kv_heads, dim)[:ctx].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
                v = v_layer.index_select(0, blocks).view(-1, kv_heads, dim)[:ctx].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
                att = F.scaled_dot_product_attention(
                    q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scaling, enable_gqa=True
                )
            out[row : row + length] = att[0].transpose(0, 1)  # [t, H, D]
        return out[None]  # [1, T, H, D]
