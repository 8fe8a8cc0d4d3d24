"""Many adapters in one batch: each token (or row) names its adapter, one forward pass runs them all.

The generator calls :func:`per_token_adapters` around ``model.forward_batch`` with one name per
token of the flat ragged batch; :func:`per_row_adapters` does the same for ordinary ``[B, S]``
batches through ``model.hf(...)``. Inside, every :class:`LoraLinear` computes the deltas of all
adapters in the batch together (see :mod:`llmspeed.lora.routing`), the way Punica and S-LoRA batch
adapters, instead of PEFT's Python loop with one sub-batch per adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..protocol import CausalLM, step_lock
from .inject import layers_set, lora_layers, registry, wrapped
from .routing import AXES, METHODS, Routing


def _validate(model: CausalLM, names: Sequence[str | None], method: str) -> list[str | None]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise ValueError(f"names must be a non-empty list of adapter names or None; got {names!r}")
    known = registry(model)
    unknown = sorted({n for n in names if n is not None and n not in known}, key=str)
    if unknown:
        raise ValueError(f"names {unknown} are not adapters on this model; adapters: {list(known) or 'none'}")
    merged = sorted({n for _, layer in lora_layers(model) for n in layer.merged})
    if merged:
        raise ValueError(
            f"adapters {merged} are merged into the base; unmerge them before mixed-adapter batches"
        )
    return list(names)


@contextmanager
def _routed(
    model: CausalLM, names: Sequence[str | None], axis: str, method: str, rows: torch.Tensor | None = None
) -> Iterator[Routing]:
    assert axis in AXES
    model = wrapped(model)  # the transformers model add_adapter took, too
    # the model's step lock for the whole block: an Engine stepping the model from another thread would run its
    # step with this routing (or leave its own on the layers when the two blocks interleave)
    with step_lock(model.module):
        names = _validate(model, names, method)
        if rows is not None:
            if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"logits_indices must be a 1-D integer tensor; got {rows!r}")
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(names)):
                raise ValueError(f"logits_indices must index the {len(names)} tokens named; got {rows.tolist()}")
        routing = Routing.from_names(names, axis, method, model.spec.device, rows)
        layers = [layer for _, layer in lora_layers(model)]
        with layers_set(layers, "routing", routing):
            yield routing


@contextmanager
def per_token_adapters(
    model: CausalLM,
    names: Sequence[str | None],
    method: str = "auto",
    logits_indices: torch.Tensor | None = None,
) -> Iterator[Routing]:
    """Inside the block, token ``t`` of the flat batch uses adapter ``names[t]`` (``None``: base only).

    For ``model.forward_batch(input_ids[T], ..., logits_indices)``: ``len(names)`` must equal ``T``; pass the same
    ``logits_indices`` here when adapters cover the output head (it sees only those tokens). The active
    adapter set by :func:`set_adapter` is ignored inside; ``method`` picks ``"concat"`` (one pass),
    ``"segment"`` (a loop over adapters) or ``"auto"``. The block holds the model's
    :func:`~llmspeed.protocol.step_lock`: an Engine stepping the model from another thread waits for it.
    """
    with _routed(model, names, "token", method, logits_indices) as routing:
        yield routing


@contextmanager
def per_row_adapters(model: CausalLM, names: Sequence[str | None], method: str = "auto") -> Iterator[Routing]:
    """Inside the block, row ``b`` of a ``[B, S]`` batch uses adapter ``names[b]`` (``None``: base only); the block
    holds the model's :func:`~llmspeed.protocol.step_lock`, as :func:`per_token_adapters` does."""
    with _routed(model, names, "row", method) as routing:
        yield routing
