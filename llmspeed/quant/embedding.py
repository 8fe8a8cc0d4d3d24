"""A tied input embedding that reads its rows from the quantized output head.

Models such as SmolLM2, Gemma and Qwen2-0.5B tie the output head to the input embedding: one
``[vocab, hidden]`` matrix serves both, 28M of SmolLM2-135M's parameters. Quantizing the head
(``quantize(model, fmt, lm_head=...)``) used to leave the float embedding in place beside the packed head,
so the model kept the fp32 matrix and a quantized copy. :class:`QuantizedEmbedding` replaces the
embedding with a lookup into the head's packed rows: token ``t``'s vector is row ``t`` of
``head.dequantize()``, bit for bit, and the float matrix is freed (113 MB for SmolLM2 in fp32).
llama.cpp stores ``token_embd`` quantized in the same way.

The head stays the owner of the tensors: the embedding holds a plain reference to it (not a submodule,
so the model's module tree, ``state_dict`` and ``linear_layers`` are unchanged) and reads the head's
buffers on every call, so ``.to(device)``, casts and loading assign them once. Saved llmspeed folders
record the sharing in their metadata (:mod:`llmspeed.quant.serialize`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .modules import QuantizedLinearBase


def unshareable(config: Any) -> str | None:
    """Why a head quantized with ``config`` cannot serve as the input embedding (its rows are not read one by
    one), or ``None`` when it can."""
    if getattr(config, "act_order", False):
        return "a head with act_order (permuted columns)"
    if config.format == "nf4" and config.double_quant:
        return "an NF4 head with double_quant (its scales dequantize by whole ranges, not by row)"
    return None


class QuantizedEmbedding(nn.Module):
    """Input embedding whose rows are the dequantized rows of a quantized (tied) output head.

    Args:
        head: The quantized head (``Int8Linear``, ``Int4Linear`` or ``NF4Linear`` without double
            quantization), ``[vocab, hidden]``.
        dtype: The dtype of the vectors returned (the model's float dtype).
        padding_idx: Kept from the replaced ``nn.Embedding`` for inspection (a lookup has no gradient).
    """

    def __init__(self, head: QuantizedLinearBase, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        if not isinstance(head, QuantizedLinearBase):
            raise ValueError(f"head must be a quantized linear module; got {type(head).__name__}")
        reason = unshareable(head.config)
        if reason is not None:
            raise ValueError(f"{reason} cannot serve as the input embedding")
        object.__setattr__(self, "head", head)  # a reference, not a submodule: the head owns its tensors
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = padding_idx
        # follows the model's casts and moves; holds no data (not in the state_dict)
        device = head.qweight.device if head.qweight.device.type != "meta" else "cpu"  # meta: a loading skeleton
        self.register_buffer("dtype_reference", torch.empty(0, dtype=dtype, device=device), persistent=False)

    head: QuantizedLinearBase
    dtype_reference: torch.Tensor  # the empty buffer registered above: its dtype is the rows' dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] int -> [..., hidden]
        """Rows ``ids`` of the head's dequantized weight, in the model's dtype."""
        flat = ids.reshape(-1)  # [n]
        if flat.device.type == "cpu":  # checked here: no device sync elsewhere
            if flat.numel() and not 0 <= int(flat.min()) <= int(flat.max()) < self.num_embeddings:
                bad = flat[(flat < 0) | (flat >= self.num_embeddings)][0]
                raise IndexError(f"ids must be token ids in [0, {self.num_embeddings}); got {int(bad)}")
        else:  # a negative id would index the head's rows from the end (a wrong vector, silently): out of range
            flat = torch.where(flat < 0, self.num_embeddings, flat)  # instead, which fails as nn.Embedding does
        rows = self.head.dequantize(self.dtype_reference.dtype, flat)  # [n, hidden]
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the {self.head.config.format} output head"


def _tied_pair(root: Any) -> tuple[nn.Module, nn.Module] | None:
    """``(input embedding, output head)`` of a transformers model whose head is tied to the embedding."""
    get_emb, get_head = getattr(root, "get_input_embeddings", None), getattr(root, "get_output_embeddings", None)
    if not (callable(get_emb) and callable(get_head)):
        return None
    emb, head = get_emb(), get_head()
    if isinstance(emb, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is emb.weight:
        return emb, head
    return None


def tied_head(model: Any) -> str | None:
    """The qualified name of ``model``'s output head when it is a float linear tied to the input embedding."""
    pair = _tied_pair(model.module)
    if pair is None:
        return None
    return next((name for name, m in model.module.named_modules() if m is pair[1]), None)


def share_tied_embedding(model: Any, head_name: str) -> QuantizedEmbedding:
    """Replace ``model``'s input embedding with a :class:`QuantizedEmbedding` reading the quantized ``head_name``."""
    root = model.module
    head = root.get_submodule(head_name)
    old = root.get_input_embeddings()  # the float embedding (on meta while a folder loads)
    embedding = QuantizedEmbedding(head, old.weight.dtype, getattr(old, "padding_idx", None))
    root.set_input_embeddings(embedding)
    return embedding


def shared_embeddings(model: Any) -> dict[str, str]:
    """``{embedding module name: head module name}`` of every :class:`QuantizedEmbedding` in ``model``."""
    root = model.module
    names = {id(m): n for n, m in root.named_modules()}
    return {n: names[id(m.head)] for n, m in root.named_modules() if isinstance(m, QuantizedEmbedding)}
