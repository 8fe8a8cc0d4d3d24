"""The checks of :class:`~llmspeed.generation.Generator`'s arguments, and the KV budget they size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..protocol import CausalLM
from .kv_cache import cache_dtype
from .sampling import is_int


def check_arguments(
    model: CausalLM,
    *,
    kv_cache_tokens: int | None,
    kv_cache_bytes: int | None,
    block_size: int,
    max_batch_tokens: int,
    max_seqs: int,
    eos_token_ids: Sequence[int] | None,
    kv_cache_dtype: Any,
    num_scheduler_steps: int,
    flags: dict[str, Any],
) -> tuple[int, tuple[int, ...] | None]:
    """``(KV budget in tokens, eos_token_ids as a tuple or None)`` for a Generator's arguments (see its docstring);
    ``TypeError`` for a model that is not one, ``ValueError`` naming the first bad argument (``flags``: the ones that
    must be True or False, by name)."""
    if not all(hasattr(model, a) for a in ("spec", "module", "forward_batch")):
        raise TypeError(
            f"model must be an llmspeed.Model (llmspeed.wrap(hf_model, tokenizer), llmspeed.models.smollm2()) or "
            f"implement llmspeed.protocol.CausalLM; got {type(model).__name__}"
        )
    if isinstance(num_scheduler_steps, bool) or not isinstance(num_scheduler_steps, int) or num_scheduler_steps < 1:
        raise ValueError(f"num_scheduler_steps must be an int >= 1; got {num_scheduler_steps!r}")
    for name, value in (("kv_cache_tokens", kv_cache_tokens), ("kv_cache_bytes", kv_cache_bytes)):
        if value is not None and not is_int(value):
            raise ValueError(f"{name} must be None or an int; got {value!r}")
    for name, value in (("block_size", block_size), ("max_batch_tokens", max_batch_tokens), ("max_seqs", max_seqs)):
        if not is_int(value):
            raise ValueError(f"{name} must be an int; got {value!r}")
    eos = tuple(eos_token_ids) if hasattr(eos_token_ids, "__iter__") else None  # type: ignore[arg-type]
    if eos_token_ids is not None and (eos is None or not all(is_int(t) and t >= 0 for t in eos)):
        raise ValueError(f"eos_token_ids must be None or a list of token ids >= 0; got {eos_token_ids!r}")
    spec = model.spec
    cache_bytes_per_token = spec.kv_bytes_per_token_at(cache_dtype(spec, kv_cache_dtype))
    if kv_cache_tokens is not None and kv_cache_bytes is not None:
        raise ValueError("give kv_cache_tokens or kv_cache_bytes, not both")
    if kv_cache_bytes is not None:
        if kv_cache_bytes < cache_bytes_per_token * block_size:
            raise ValueError(
                f"kv_cache_bytes must hold at least one block ({cache_bytes_per_token * block_size} bytes); "
                f"got {kv_cache_bytes}"
            )
        kv_cache_tokens = kv_cache_bytes // cache_bytes_per_token
    kv_cache_tokens = 16384 if kv_cache_tokens is None else kv_cache_tokens
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    if kv_cache_tokens < block_size:
        raise ValueError(f"kv_cache_tokens must be >= block_size={block_size}; got {kv_cache_tokens}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False; got {flag!r}")
    return kv_cache_tokens, eos
