"""Requests and the model's LoRA adapters: whether a request may name an adapter, what its keys and values depend
on, and what happens to live requests when the adapters change between steps.

``llmspeed.lora`` is imported only when the model carries adapters (a model without them never needs it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from ..protocol import CausalLM

AdapterKey = tuple[str, int, int]  # (adapter name, uid, hash of its tensors' storages and versions)


def _has_adapters(model: CausalLM) -> bool:
    return bool(model.module.__dict__.get("_llmspeed_lora"))


def adapter_error(model: CausalLM, name: str) -> str | None:
    """Why a request naming adapter ``name`` cannot run on ``model`` (``None``: it can)."""
    try:
        from .. import lora
    except ImportError:
        return f"adapter {name!r} requested, but LoRA support (llmspeed.lora) is not available"
    known = lora.adapter_names(model)
    if name not in known:
        return f"adapter must be one of the model's adapters {sorted(known)}; got {name!r}"
    return merged_refusal(model, name)


def merged_refusal(model: CausalLM, name: str | bool, when: str = "") -> str | None:
    """Why a request naming adapter ``name`` (``False``: the base alone) cannot run while adapters are merged into the
    base (its step would run in mixed-adapter batches, which refuse merged adapters and would fail every request of
    the batch; and the base alone is no longer there to run)."""
    if name is False and not _has_adapters(model):
        return None  # no adapters on the model: llmspeed.lora need not be imported
    from ..lora.inject import lora_layers

    merged = sorted({n for _, layer in lora_layers(model) for n in layer.merged})
    if not merged:
        return None
    if name is False:
        return (f"adapter=False (the base model alone) cannot run while adapters {merged} are merged into the "
                f"base{when} (lora.merge): unmerge them (lora.unmerge), or name no adapter (None) to run the model "
                f"as it is")  # fmt: skip
    return (f"adapter {name!r} cannot run while adapters {merged} are merged into the base{when} (lora.merge): "
            f"requests that name an adapter need them unmerged (lora.unmerge)")  # fmt: skip


def adapter_key(model: CausalLM, name: str | Literal[False] | None) -> AdapterKey | None:
    """``(adapter, uid, weights)`` a request's keys/values depend on (:func:`llmspeed.lora.inject.adapter_identity`;
    ``name=None``: the active adapter; ``None`` when no adapter applies, as for ``name=False``, the base alone).
    ``weights`` hashes the storage and version of the adapter's tensors, so that prefix-cache blocks computed before
    the adapter was trained or edited in place are not reused after."""
    if name is False or (name is None and not _has_adapters(model)):
        return None  # no adapters on the model: llmspeed.lora need not be imported
    from ..lora.inject import adapter_identity, lora_layers

    identity = adapter_identity(model, name)
    if identity is None:
        return None
    tensors = [t for _, layer in lora_layers(model) if identity[0] in layer.lora_A
               for t in (layer.weight_a(identity[0]), layer.weight_b(identity[0]))]  # fmt: skip
    return (*identity, hash(tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)))


def follow(model: CausalLM, seen: int | None, seqs: Iterable[Any]) -> tuple[int | None, list[tuple[Any, str]]]:
    """After any change to ``model``'s adapters since ``seen`` (lora's ``STATE_CHANGES`` then; ``None``: never
    looked): the new count, and the live requests of ``seqs`` that must end, each with its error.

    A request bound to an adapter that was deleted, or deleted and another added under its name, or that names an
    adapter or the base alone (``False``) while adapters are merged into the base (:func:`merged_refusal`), ends. Requests that name no adapter
    run the active one as it is set now (``set_adapter``, ``disabled``): their ``adapter_key`` is updated here, so
    their admission and next prefix-cache blocks are keyed by it, not by the one active when they were added.
    """
    if seen is None and not _has_adapters(model):
        return None, []  # no adapters on the model, now or at any earlier step: llmspeed.lora need not be imported
    from ..lora.inject import registry
    from ..lora.layer import STATE_CHANGES

    if seen == STATE_CHANGES[0]:
        return seen, []
    known = {name: info.uid for name, info in registry(model).items()}
    active = adapter_key(model, None)
    ended = []
    for seq in list(seqs):
        name = seq.params.adapter
        if seq.is_finished:
            continue
        if name is None:
            seq.adapter_key = active
        elif name is not False and known.get(name) != seq.adapter_key[1]:  # False (the base alone): no adapter
            replaced = " and another adapter added under its name" if name in known else ""
            ended.append((seq, f"adapter {name!r} was deleted{replaced} while this request was running"))
        elif (refusal := merged_refusal(model, name, " (merged while this request was running)")) is not None:
            ended.append((seq, refusal))  # ended alone: left in, its step would fail the other requests of its batch
    return STATE_CHANGES[0], ended
