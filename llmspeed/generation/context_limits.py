"""How much context a :class:`~.engine.Generator` may hold for a model: its positions, unless its attention or its
rotary embedding would make a sequence's result depend on the batch past some length (the paged attention
attends to every cached token, and one ragged forward carries every sequence of a step)."""

from __future__ import annotations

import math
from typing import Any

from ..protocol import CausalLM
from ..ragged_attention import layer_kinds


def _positions(n: object) -> int | None:
    """A config's count of positions as an int, or ``None`` when it sets none (absent, zero or below, not a number).

    A float counts too: a JSON config or a user can carry ``4096.0``, and transformers compares the float as it is
    (longrope switches to its long factors once ``seq_len > original_max_position_embeddings``), so the whole
    positions below it, ``floor(n)``, are the ones it treats as within."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n):
        return None
    n = math.floor(n)
    return n if n > 0 else None


def _text_config(model: CausalLM) -> Any:
    """The config of the model's text part (``None`` for a model that is not a wrapped transformers model)."""
    return model.hf.config.get_text_config() if hasattr(model, "hf") else None


def attention_window(model: CausalLM) -> int | None:
    """The sliding window of a model whose attention uses one (Mistral's ``sliding_window``; Qwen2's and Qwen3's
    with ``use_sliding_window``), or ``None``. The paged attention here attends to every cached token, which is
    the model's own attention only while a sequence fits in the window, so a generator holds at most that many."""
    cfg = _text_config(model)
    window = _positions(getattr(cfg, "sliding_window", None))
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return window


def attention_chunk(model: CausalLM) -> int | None:
    """The attention chunk of a model with ``"chunked_attention"`` layers (Llama 4's ``attention_chunk_size``), or
    ``None``: such a layer attends only within its token's chunk, which is the paged attention's causal attention
    over every cached token only while a sequence fits in one chunk, so a generator holds at most that many."""
    cfg = _text_config(model)
    if cfg is None or "chunked_attention" not in layer_kinds(cfg):
        return None
    return _positions(getattr(cfg, "attention_chunk_size", None))


def rope_context(model: CausalLM) -> int | None:
    """The context up to which a model's rotary embedding gives every sequence its own rows, or ``None`` (all of it).

    ``longrope`` (Phi-3's 128k models, ``rope_parameters["rope_type"] == "longrope"``) switches every position of a
    forward pass to its long factors once the pass's highest position passes ``original_max_position_embeddings``.
    A ragged batch is one pass over several sequences, so a short sequence stepped beside a long one would be rotated
    with the long factors that it alone never gets: its tokens would depend on the batch. Up to that length no
    sequence reaches the long factors, so a generator holds at most that many tokens."""
    bounds = [n for n in map(_positions, _longrope_originals(model)) if n is not None]
    return min(bounds) if bounds else None


def _longrope_originals(model: CausalLM) -> list[object]:
    """The ``original_max_position_embeddings`` of each longrope in the model's config, as the config holds them."""
    cfg = _text_config(model)
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    per_layer = params.values() if all(isinstance(v, dict) for v in params.values()) and params else [params]
    return [
        p.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
        for p in per_layer
        if p.get("rope_type", p.get("type")) == "longrope"
    ]


def context_limit(model: CausalLM, max_positions: int, max_model_len: int | None = None) -> tuple[int, str]:
    """``(tokens a sequence may hold, why when fewer than max_positions)``: the reason reads on after "the model's
    context holds N" in the scheduler's refusal of a longer prompt (empty when the model's positions are the limit).
    ``max_model_len``: a lower limit the caller sets (vLLM's); ``ValueError`` when it is not an int from 2 to the
    model's own limit."""
    window = attention_window(model)  # past it the model's attention is windowed and ours would not be
    chunk = attention_chunk(model)  # past it the model's attention is chunked and ours would not be
    rope = rope_context(model)  # past it a sequence's rotary rows would depend on the batch it is stepped in
    context = min(n for n in (max_positions, window, chunk, rope) if n is not None)
    if max_model_len is not None:
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or not 2 <= max_model_len <= context:
            raise ValueError(f"max_model_len must be None or an int from 2 (a prompt token and a new one) to {context}, "
                             f"the most this model holds here; got {max_model_len!r}")  # fmt: skip
        if max_model_len < context:
            return max_model_len, f" here: max_model_len={max_model_len}"
    if window is not None and context == window and window < max_positions:
        return context, (f" here: its attention's sliding window (sliding_window={window} in its config), which the "
                         f"paged attention does not apply past the window")  # fmt: skip
    if chunk is not None and context == chunk and chunk < max_positions:
        return context, (f" here: its chunked attention (attention_chunk_size={chunk} in its config), which the paged "
                         f"attention does not apply past the first chunk")  # fmt: skip
    if rope is not None and context == rope and rope < max_positions:
        held = next(n for n in _longrope_originals(model) if _positions(n) == rope)  # as the config holds it: 16.5
        return context, (f" here: its longrope rotary embedding's original_max_position_embeddings={held}, past which "
                         f"it rotates every sequence of a ragged batch with the long factors once any one of them "
                         f"passes it")  # fmt: skip
    return context, ""
