"""Decode attention over the paged KV cache on the CPU, by running sequences and context length.

Every decode step reads the cached keys and values of every running sequence once per layer
(``llmspeed/generation/paged_attention.h``, the fused step's attention and the per-layer path's decode
kernel). This suite times that kernel alone (:func:`llmspeed.generation.fused_decode.paged_decode`) with the
model's head geometry, one call per layer over a cache of all the model's layers (so, as in a real step, each
layer's blocks come from memory, not from the previous call's cache lines), and reports the bytes of cache
it reads per second. As a reference it times ``scaled_dot_product_attention`` on the same keys and values
laid out contiguously, per sequence (what the per-layer path ran before the kernel, without its gather).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ..generation import fused_decode
from ..timing import timeit
from .models import load_model

CASES = ((1, 128), (1, 1024), (8, 128), (8, 512), (32, 512))
BLOCK = 16
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # Generator(kv_cache_dtype=...)
MAX_CACHE_BYTES = 512 << 20  # fewer layers than the model's when all of them would hold more


def _measure(spec, dtype: torch.dtype, n: int, ctx: int, reps: int, g: torch.Generator) -> dict[str, Any]:
    heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    width = -(-ctx // BLOCK)
    per_layer = 2 * n * ctx * kv_heads * dim * dtype.itemsize  # keys and values read by one call
    layers = max(1, min(spec.num_layers, MAX_CACHE_BYTES // per_layer))
    blocks = n * width + 1
    caches = [
        (torch.randn(blocks, BLOCK, kv_heads, dim, generator=g).to(dtype),
         torch.randn(blocks, BLOCK, kv_heads, dim, generator=g).to(dtype))
        for _ in range(layers)
    ]  # fmt: skip
    tables = torch.randperm(blocks, generator=g)[: n * width].view(n, width)  # [n, W], blocks out of order
    lens = torch.full((n,), ctx, dtype=torch.long)
    q = torch.randn(n, heads, dim, generator=g)  # [n, H, D]
    scale = dim**-0.5
    dense = [  # per sequence: q [H, 1, D], keys and values [H, L, D], contiguous, each KV head repeated per group
        (q[i, :, None].to(dtype),
         *(c[tables[i]].reshape(-1, kv_heads, dim)[:ctx].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
           .contiguous() for c in caches[0]))
        for i in range(n)
    ]  # fmt: skip

    def kernel() -> None:
        for k, v in caches:
            fused_decode.paged_decode(q, k, v, tables, lens, scale)

    def sdpa() -> None:
        for qi, k, v in dense:
            torch.nn.functional.scaled_dot_product_attention(qi, k, v, scale=scale)

    kernel_ms = timeit(kernel, repeats=reps).median * 1e3 / layers
    sdpa_ms = timeit(sdpa, repeats=reps).median * 1e3
    return {
        "dtype": str(dtype).removeprefix("torch."), "sequences": n, "context": ctx, "layers": layers,
        "cache MB per layer": round(per_layer / 1e6, 3), "kernel us per layer": round(kernel_ms * 1e3, 1),
        "GB/s": round(per_layer / (kernel_ms * 1e-3) / 1e9, 2), "SDPA us (contiguous)": round(sdpa_ms * 1e3, 1),
        "SDPA / kernel": round(sdpa_ms / kernel_ms, 2),
    }  # fmt: skip


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Rows ``{dtype, sequences, context, layers, cache MB per layer, kernel us per layer, GB/s, SDPA us, SDPA / kernel}``."""
    if device != "cpu":
        raise ValueError(f"the C++ paged decode attention runs on the CPU; got device={device!r}")
    spec = load_model(model, "cpu", progress=progress).spec
    cases, reps = (((1, 128), (8, 128)), 5) if quick else (CASES, 15)
    g = torch.Generator().manual_seed(0)
    work = [(dtype, n, ctx) for dtype in CACHE_DTYPES for n, ctx in cases]
    return [_measure(spec, dtype, n, ctx, reps, g) for dtype, n, ctx in tqdm(work, desc="decode attention", disable=not progress)]
