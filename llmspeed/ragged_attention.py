"""The ragged forward pass's side of transformers' attention interface: the ``"llmspeed"`` attention
implementation, which hands each layer's q, k, v to the llmspeed backend passed through the forward call
(:meth:`llmspeed.Model.forward_batch`), and the checks of a ragged batch's tensors."""

from __future__ import annotations

from typing import Any

import torch

from .protocol import AttentionBackend

ATTN_IMPLEMENTATION = "llmspeed"
BACKEND_KWARG = "llmspeed_attention"
# what some families hand their attention function beyond q, k, v and scaling, which the backends do not apply:
# Gemma-2's logit soft-capping, gpt-oss's attention sinks
_UNAPPLIED = {"softcap": "logit soft-capping", "s_aux": "attention sinks", "sinks": "attention sinks"}


ATTENTION_LAYERS = frozenset({"attention", "full_attention", "sliding_attention", "chunked_attention"})
"""Layer kinds (a config's ``layer_types``) the paged KV cache computes as the model does: causal attention over every
cached key and value, with a sliding window or attention chunks capping the context (:mod:`llmspeed.generation.context_limits`)."""


def layer_kinds(config: Any) -> set[str]:
    """The kinds of layer a transformers config names (``layer_types``, RecurrentGemma's ``block_types``, hybrid
    models' ``layers_block_type``), for its text model."""
    cfg = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    kinds: set[str] = set()
    for attr in ("layer_types", "block_types", "layers_block_type"):
        value = getattr(cfg, attr, None)
        if isinstance(value, (list, tuple)):
            kinds |= {str(v) for v in value}
    return kinds


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered with transformers: hands the layer to the llmspeed backend."""
    backend: AttentionBackend | None = kwargs.get(BACKEND_KWARG)
    if backend is None:
        raise RuntimeError(
            "the 'llmspeed' attention implementation only runs inside Model.forward_batch; "
            "use model.hf(...) for ordinary forward passes (a model.hf call from another thread while a generator "
            "or engine steps the same model meets this too: the step switches the config's attention "
            "implementation for its duration; submit the work to the engine instead)"
        )
    for name, what in _UNAPPLIED.items():
        if kwargs.get(name) is not None:
            raise TypeError(
                f"{type(module).__name__} asks its attention for {what} ({name}=...), which llmspeed's paged "
                f"attention does not apply: its logits would not be the model's. Generate with model.hf.generate"
            )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return backend(module.layer_idx, query, key, value, scaling), None


def register_attention() -> None:
    """Register :func:`attention_forward` with transformers' ``AttentionInterface`` as ``"llmspeed"`` (once)."""
    from transformers import AttentionInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)



def check_ragged(input_ids: Any, positions: Any, logits_indices: Any) -> None:
    """``TypeError``/``ValueError`` naming the argument of ``forward_batch`` that is not as it takes them, before
    the backend stores anything: 1-D integer tensors, one position per token. Metadata only (no device sync).

    An ``int`` for ``logits_indices`` would reach transformers' ``logits_to_keep``, which reads it as "the last
    N rows", not row N; a boolean mask or a 2-D batch ``[1, T]`` would run with other shapes than the caller's.
    """
    for name, t in (("input_ids", input_ids), ("positions", positions), ("logits_indices", logits_indices)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            got = f"a {str(t.dtype).removeprefix('torch.')} tensor" if isinstance(t, torch.Tensor) else repr(t)
            raise TypeError(f"{name} must be a 1-D integer (int64) tensor; got {got}")
        if t.ndim != 1:
            raise ValueError(f"{name} must be 1-D (the ragged batch flattened: [T] tokens, [N] rows); "
                             f"got shape {list(t.shape)}")  # fmt: skip
    if input_ids.shape[0] == 0 or positions.shape != input_ids.shape:
        raise ValueError(f"input_ids and positions must hold one entry per token (at least one); got "
                         f"{input_ids.shape[0]} input_ids and {positions.shape[0]} positions")  # fmt: skip
