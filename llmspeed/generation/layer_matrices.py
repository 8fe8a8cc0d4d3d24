"""The seven matrices of a decoder layer the fused decode step reads, in its order (q, k, v, o, gate, up, down), as
the linear holding each and the rows of it that are the matrix.

Llama-style layers (Llama, Mistral, Qwen2, Qwen3) hold them apart. Phi-3 fuses the query, key and value projections
into ``qkv_proj`` (rows ``[q; k; v]``) and the gate and up projections into ``gate_up_proj`` (rows ``[gate; up]``):
each matrix is then a range of rows of the fused linear, read where it lies (a row range of a float weight, of packed
codes and of per-row scales and zero points is a contiguous view: nothing is copied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Matrix:
    """One matrix of the step: ``name`` (of :data:`MATRICES`) is rows ``rows`` (``None``: all) of the linear at
    ``owner.attr`` (``attr`` is ``name`` itself unless the layer fuses it)."""

    name: str
    owner: nn.Module
    attr: str
    rows: slice | None = None

    @property
    def module(self) -> Any:
        """The linear (or LoRA wrapper) holding the matrix."""
        return getattr(self.owner, self.attr)


def layer_matrices(layer: Any, config: Any) -> list[Matrix]:
    """The matrices of decoder ``layer`` (a transformers decoder layer: ``self_attn`` and ``mlp``) in :data:`MATRICES`
    order; ``config``: the model's text config (head counts and sizes, for the row ranges of fused projections)."""
    attn, mlp = layer.self_attn, layer.mlp
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q, kv = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = config.intermediate_size
    out: list[Matrix] = []
    if hasattr(attn, "qkv_proj"):
        out += [Matrix("q_proj", attn, "qkv_proj", slice(0, q)), Matrix("k_proj", attn, "qkv_proj", slice(q, q + kv)),
                Matrix("v_proj", attn, "qkv_proj", slice(q + kv, q + 2 * kv))]  # fmt: skip
    else:
        out += [Matrix(n, attn, n) for n in ("q_proj", "k_proj", "v_proj")]
    out.append(Matrix("o_proj", attn, "o_proj"))
    if hasattr(mlp, "gate_up_proj"):
        out += [Matrix("gate_proj", mlp, "gate_up_proj", slice(0, inter)),
                Matrix("up_proj", mlp, "gate_up_proj", slice(inter, 2 * inter))]  # fmt: skip
    else:
        out += [Matrix(n, mlp, n) for n in ("gate_proj", "up_proj")]
    out.append(Matrix("down_proj", mlp, "down_proj"))
    return out


__all__ = ["MATRICES", "Matrix", "layer_matrices"]
