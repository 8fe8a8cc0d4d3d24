"""LoRA adapters inside the fused CPU decode step: each row of a decode batch with its own adapter.

A LoRA-wrapped projection (``llmspeed.lora.LoraLinear``, recognised by its ``base_layer`` and
``lora_A``/``lora_B``) joins the fused step when its adapters are unmerged and its dropout cannot
fire. Its adapters are stacked once per snapshot: ``A [S, R, in]`` and ``B [S, R, out]`` (B transposed),
one slot per adapter name on the model (sorted), zero-padded to the largest rank and with the adapter's
scale folded into ``B``; an adapter that does not touch a projection is zeros there. The C++ step then
adds ``B[s] (A[s] x)`` to each row's projection output for the slot ``s`` of that row's adapter
(``decode_cpu.cpp``'s ``lora_add``), the way the generic path's routed deltas do.

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


def is_lora(module: Any) -> bool:
    """Whether ``module`` is a LoRA wrapper (``base_layer`` plus ``lora_A``/``lora_B`` dicts)."""
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def unfusable_reason(module: Any) -> str | None:
    """Why the fused step cannot apply this LoRA wrapper's adapters, or ``None`` when it can."""
    if module.merged:
        return f"adapters {module.merged} are merged into the base"
    if module.disabled:
        return "its adapters are disabled"
    for name, dropout in module.lora_dropout.items():
        if dropout.training and getattr(dropout, "p", 0.0) > 0:
            return f"adapter {name!r} has dropout in training mode"
    return None


def state(module: Any) -> tuple:
    """What the stacks of this wrapper depend on besides tensor contents (names, scales, active, flags).

    Read straight from the module's ``__dict__``: the fused step checks it for every wrapper at every
    step, and ``nn.Module.__getattr__`` would cost several microseconds a lookup.
    """
    d = module.__dict__
    return (tuple(d["_modules"]["lora_A"]._modules), tuple(d["scaling"].values()), d["active"], d["disabled"],
            tuple(d["merged"]), d["training"])  # fmt: skip


def weights(module: Any) -> list[torch.Tensor]:
    """Every A and B of the wrapper (their ``_version`` changes when training updates them in place)."""
    return [t for n in module.lora_A for t in (module.weight_a(n), module.weight_b(n))]


LORA_DTYPES = (torch.float16, torch.float32)


def stacks(module: Any, slots: list[str], dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [S, R, in], B [S, R, out])`` for ``slots`` (adapter names); empty tensors if none applies.

    ``B`` is stored transposed so that the step adds each rank's contribution to a whole output row as one
    contiguous multiply-add (no horizontal sum per output element). ``dtype``: one of :data:`LORA_DTYPES`;
    fp16 stacks whose values would overflow it are returned in fp32.
    """
    present = [n for n in slots if n in module.lora_A]
    if not present:
        return torch.empty(0), torch.empty(0)
    rank = max(module.rank(n) for n in present)
    a = torch.zeros(len(slots), rank, module.in_features)  # [S, R, in]
    b = torch.zeros(len(slots), rank, module.out_features)  # [S, R, out]
    with torch.no_grad():
        for s, name in enumerate(slots):
            if name in module.lora_A:
                r = module.rank(name)
                a[s, :r] = module.weight_a(name).float()  # [r, in]
                b[s, :r] = module.weight_b(name).float().T * module.scaling[name]  # [r, out]
    limit = torch.finfo(dtype).max
    if dtype != torch.float32 and max(a.abs().max(), b.abs().max()) <= limit:
        return a.to(dtype), b.to(dtype)
    return a, b


def slot_ids(names: list[str | None], slots: list[str]) -> torch.Tensor:  # [n] int64
    """The stack slot of each row's adapter name (``-1`` for none)."""
    index = {name: i for i, name in enumerate(slots)}
    return torch.tensor([-1 if n is None else index[n] for n in names], dtype=torch.long)
