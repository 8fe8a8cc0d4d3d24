"""Prompt chunks that start their sequences, attended in one FlashAttention varlen call (CUDA).

A step that admits new requests holds many prompt chunks from position 0. Their keys are their own tokens' (nothing
cached before them), so the whole set is causal attention over packed sequences: what FlashAttention's varlen kernel
computes (``torch.nn.attention.varlen.varlen_attn``), with no cache read, no padding to the longest chunk and no
mask. The per-layer path's other prefill attention (:class:`~.kv_cache.PagedAttention`'s gather + masked SDPA) pads
every chunk to the longest one, reads the chunks' keys back from the paged cache, and on CUDA expands grouped-query
keys to every query head; on the last H100 run the choice of prefill attention alone moved the batching suite's 5
mixed steps by 0.6 s, against 0.52 s for all its decode steps (docs/gpu.md). :func:`probe` runs the kernel once
against :func:`fresh_reference` before a generator uses it.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, cast

import torch
import torch.nn.functional as F

from .kv_cache import cu_seq

_PROBED: dict[str, str | None] = {}


def fresh_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float,
                  out: torch.Tensor) -> None:  # fmt: skip
    """Causal attention of packed chunks that start their sequences, into ``out`` ``[T, H, D]``: ``q`` ``[T, H, D]``,
    ``k``/``v`` ``[T, Hkv, D]`` (the chunks' own keys and values), ``cu`` ``[m + 1]`` int32 (:func:`.kv_cache.cu_seq`),
    ``max_len`` the longest chunk. FlashAttention's varlen kernel (CUDA, fp16/bf16)."""
    from torch.nn.attention.varlen import varlen_attn

    takes = _parameters(varlen_attn)
    if k.shape[1] != q.shape[1] and "enable_gqa" not in takes:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [T, H, D]: an older torch without GQA
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # [T, H, D]
    options: dict[str, Any] = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if "window_size" in takes:
        options["window_size"] = (-1, 0)  # causal
    else:
        options["is_causal"] = True  # torch 2.9's spelling
    if "scale" in takes:
        options["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:  # a torch whose kernel scales by 1/sqrt(D) only: the rest on the queries
        q = q * (scale * q.shape[-1] ** 0.5)
    att = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len,
                      **options)  # fmt: skip  # [T, H, D] (no aux asked for)
    out.copy_(cast(torch.Tensor, att))


@lru_cache(maxsize=4)
def _parameters(fn: Any) -> frozenset[str]:
    """The keyword names ``fn`` takes (read once: every layer of every mixed step calls the kernel)."""
    return frozenset(inspect.signature(fn).parameters)


def fresh_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float,
                    out: torch.Tensor) -> None:  # fmt: skip
    """:func:`fresh_prefill` chunk by chunk with SDPA's causal attention (any device and dtype)."""
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        att = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
            is_causal=True, scale=scale, enable_gqa=True,
        )  # [1, H, n, D]
        out[a:b] = att[0].transpose(0, 1)  # [n, H, D]


def unavailable(device: torch.device) -> str | None:
    """Why the varlen kernel cannot run on ``device`` (``None``: it may; :func:`probe` checks it does)."""
    if device.type != "cuda":
        return f"FlashAttention's varlen kernel runs on CUDA; the model is on {device.type}"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError as err:
        return f"this torch has no torch.nn.attention.varlen ({err})"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "FlashAttention needs compute capability 8.0 or newer"
    return None


def probe(device: torch.device, dtype: torch.dtype, kv_heads: int, heads: int, dim: int) -> str | None:
    """Run :func:`fresh_prefill` once on random chunks of these shapes; ``None`` if it matches
    :func:`fresh_reference`, else why not (cached per device, dtype and shape)."""
    key = f"{device}|{dtype}|{kv_heads}|{heads}|{dim}"
    if key in _PROBED:
        return _PROBED[key]
    why = unavailable(device)
    if why is None and dtype not in (torch.float16, torch.bfloat16):
        why = f"FlashAttention takes fp16 and bf16; the model is {dtype}"
    if why is None:
        try:
            gen = torch.Generator().manual_seed(0)
            lengths = [1, 37, 130]
            cu = cu_seq(lengths, torch.device(device))
            t = sum(lengths)
            q = torch.randn(t, heads, dim, generator=gen).to(device=device, dtype=dtype)  # [T, H, D]
            k = torch.randn(t, kv_heads, dim, generator=gen).to(device=device, dtype=dtype)  # [T, Hkv, D]
            v = torch.randn(t, kv_heads, dim, generator=gen).to(device=device, dtype=dtype)  # [T, Hkv, D]
            got, want = torch.zeros_like(q), torch.zeros_like(q)
            fresh_prefill(q, k, v, cu, max(lengths), dim**-0.5, got)
            fresh_reference(q, k, v, cu, max(lengths), dim**-0.5, want)
            err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))
            if not err <= 2e-2:
                why = f"FlashAttention's varlen kernel disagrees with SDPA: relative error {err:.2e} > 2e-2"
        except Exception as exc:  # noqa: BLE001 - a kernel that fails to run is simply not used
            why = f"FlashAttention's varlen kernel failed to run: {type(exc).__name__}: {exc}"
    _PROBED[key] = why
    return why
