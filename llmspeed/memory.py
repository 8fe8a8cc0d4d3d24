"""``memory_footprint``: bytes a model occupies, broken down by what holds them."""

from __future__ import annotations

from torch import nn

from .model import as_model
from .protocol import CausalLM

CATEGORIES = ("linear", "embedding", "adapters", "other")


def _tensors(module: nn.Module):
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    # a LoRA wrapper keeps the layers a merge replaced (``premerge``, restored by unmerge) outside the module tree
    kept = getattr(module, "premerge", None)
    for layer in kept.values() if isinstance(kept, dict) else ():
        if isinstance(layer, nn.Module):
            yield from layer.parameters()
            yield from layer.buffers()


def memory_footprint(model: CausalLM) -> dict[str, int]:
    """Bytes of every parameter and buffer of ``model``, each storage counted once (on the ``meta`` device, each
    tensor: a model built there to be sized without memory reports the bytes it would take).

    Returns:
        ``{"total", "linear", "embedding", "adapters", "other"}`` in bytes. ``linear`` is
        everything at the model's linear positions (packed weights, scales and zero points of
        quantized layers included), except LoRA adapter matrices, which are ``adapters``.
        A float weight tied between the embedding and the output head counts once, as ``embedding``; a quantized
        head that also serves as the input embedding (``quantize``'s default for a tied head) counts as ``linear``. The layers a
        LoRA merge replaced and keeps for unmerge (a quantized base re-quantized, a tied head merged into a copy)
        count as ``linear``: they stay in memory until unmerge or ``merge_and_unload``.
    """
    model = as_model(model)
    root = model.module
    linear_prefixes = tuple(name + "." for name in model.linear_names())
    linear_names = set(model.linear_names())
    seen: set[tuple[str, int]] = set()
    out = dict.fromkeys(CATEGORIES, 0)

    def add(tensors, category: str) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            # meta tensors (a model built under torch.device("meta") to size it) all have data_ptr 0: tell them
            # apart by the tensor itself (a tied weight is one Parameter, still counted once)
            key = (str(tensor.device), storage.data_ptr() if tensor.device.type != "meta" else id(tensor))
            if key in seen:
                continue
            seen.add(key)
            out[category] += storage.nbytes()

    for name, module in root.named_modules():
        if name.split(".")[-1].startswith("lora_") or ".lora_" in name:
            category = "adapters"
        elif isinstance(module, nn.Embedding):
            category = "embedding"
        elif name in linear_names or name.startswith(linear_prefixes):
            category = "linear"
        else:
            category = "other"
        add(_tensors(module), category)
    # a quantized input embedding reads the head it references outside the module tree (QuantizedEmbedding.head):
    # the output head, counted above, or after lora.merge_and_unload of an adapter on that head, the head the
    # merge replaced, which the embedding alone keeps in memory
    for module in root.modules():
        head = module.__dict__.get("head")
        if isinstance(head, nn.Module):
            add([*head.parameters(), *head.buffers()], "linear")
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out
