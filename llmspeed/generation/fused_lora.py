"""LoRA adapters inside the fused CPU decode step: each row of a decode batch with its own adapter.

A LoRA-wrapped projection (``llmspeed.lora.LoraLinear``, recognised by its ``base_layer`` and
``lora_A``/``lora_B``) joins the fused step when its adapters are unmerged and its dropout cannot
fire. Its adapters are stacked once per snapshot: ``A [S, R, in]`` and ``B [S, NB, R, 16]`` (B transposed,
in blocks of 16 outputs: :func:`stacks`), one slot per adapter name on the model (sorted), zero-padded to
the largest rank and with the adapter's scale folded into ``B``; an adapter that does not touch a
projection is zeros there. The C++ step then adds ``B[s] (A[s] x)`` to each row's projection output for
the slot ``s`` of that row's adapter (``decode_cpu.cpp``'s ``LoraDeltas``), the way the generic path's
routed deltas do.

The stacks are fp16 by default (``lora_dtype``), as llama.cpp's LoRA files are: a step reads every
stacked adapter's bytes, and a few r=16 adapters on every projection weigh, in fp32, about as much as
a 4-bit model (docs/lora.md has the measurements). Each weight then carries fp16's relative rounding
(at most 2^-11) and the products are summed in fp32; a projection whose stacked values do not fit fp16's
range stays fp32. ``lora_dtype=torch.float32`` stacks the adapters exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..lora.layer import STATE_CHANGES
from ..quant.hadamard import rotate


def is_lora(module: Any) -> bool:
    """Whether ``module`` is a LoRA wrapper (``base_layer`` plus ``lora_A``/``lora_B`` dicts)."""
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def unfusable_reason(module: Any) -> str | None:
    """Why the fused step cannot apply this LoRA wrapper's adapters, or ``None`` when it can."""
    if module.merged:
        return f"adapters {list(module.merged)} are merged into the base"
    if module.disabled:
        return "its adapters are disabled"
    for name, dropout in module.lora_dropout.items():
        if dropout.training and getattr(dropout, "p", 0.0) > 0:
            return f"adapter {name!r} has dropout in training mode"
    return None


def state_changes() -> int:
    """Changes to any LoRA wrapper's adapters, scales or flags so far in this process
    (:data:`llmspeed.lora.layer.STATE_CHANGES`): what the stacks depend on besides tensor contents."""
    return STATE_CHANGES[0]


def weights(module: Any, name: str) -> list[torch.Tensor]:
    """Adapter ``name``'s A and B on the wrapper, none if it lacks one (their ``_version`` changes when training
    updates them in place)."""
    return [module.weight_a(name), module.weight_b(name)] if name in module.lora_A else []


LORA_DTYPES = (torch.float16, torch.float32)
LORA_BLOCK = 16  # outputs per block of a B stack (decode_cpu.cpp's LORA_BLOCK)


def stacks(module: Any, slots: list[str], dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [S, R, in], B [S, NB, R, 16])`` for ``slots`` (adapter names); empty tensors if none applies.

    ``B`` holds ``B^T`` (scale folded in) in blocks of :data:`LORA_BLOCK` outputs (``NB = ceil(out / 16)``, the
    last zero-padded), each block's R ranks one after another, so that the step reads a row's delta front to
    back and sums the ranks of 16 outputs in registers. Over a ``hadamard`` base (whose input the step rotates
    within groups before the adapters read it) ``A`` is rotated the same way. ``dtype``: one of :data:`LORA_DTYPES`; fp16 stacks whose
    values would overflow it are returned in fp32.
    """
    present = [n for n in slots if n in module.lora_A]
    if not present:
        return torch.empty(0), torch.empty(0)
    rank = max(module.rank(n) for n in present)
    blocks = -(-module.out_features // LORA_BLOCK)
    a = torch.zeros(len(slots), rank, module.in_features)  # [S, R, in]
    bt = torch.zeros(len(slots), rank, blocks * LORA_BLOCK)  # [S, R, out padded]
    with torch.no_grad():
        for s, name in enumerate(slots):
            if name in module.lora_A:
                r = module.rank(name)
                a[s, :r] = module.weight_a(name).float()  # [r, in]
                bt[s, :r, : module.out_features] = module.weight_b(name).float().T * module.scaling[name]  # [r, out]
    config = getattr(module.base_layer, "config", None)
    if config is not None and getattr(config, "hadamard", False):  # the step rotates this layer's input in place: x' A'^T = x A^T
        a = rotate(a, config.group_size)  # [S, R, in]
    b = bt.view(len(slots), rank, blocks, LORA_BLOCK).transpose(1, 2).contiguous()  # [S, NB, R, 16]
    limit = torch.finfo(dtype).max
    if dtype != torch.float32 and max(a.abs().max(), b.abs().max()) <= limit:
        return a.to(dtype), b.to(dtype)
    return a, b


def block_aligned(rows: slice) -> bool:
    """Whether a row range of a fused projection starts and ends on :data:`LORA_BLOCK` boundaries: its rows' part of
    the projection's B stack is then whole blocks (Phi-3's q/k/v and gate/up: :mod:`.layer_matrices`)."""
    return rows.start % LORA_BLOCK == 0 and rows.stop % LORA_BLOCK == 0


def slot_ids(names: list[str | None], slots: list[str]) -> torch.Tensor:  # [n] int64
    """The stack slot of each row's adapter name (``-1`` for none)."""
    index = {name: i for i, name in enumerate(slots)}
    return torch.tensor([-1 if n is None else index[n] for n in names], dtype=torch.long)
