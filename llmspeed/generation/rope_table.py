"""Rotary cos/sin rows looked up in a table built by the model's own rotary module, not recomputed each step.

A decode step needs the rotary rows of one position per sequence. Calling the model's rotary module
for them costs about 50 us of small ops per step (more once the step's weight reads have pushed its
state out of the cache): a few percent of a one-sequence decode step of a 135M model on the CPU. For
rotary types whose frequencies never change (all but transformers' ``dynamic`` and ``longrope`` ones,
which recompute them from the sequence length), the rows are a fixed function of the position, so
:class:`RopeTable` computes them once for a range of positions with the module itself and indexes them.
The table is rebuilt when the module's frequencies or scaling change and grows (doubling) when a
position is past its end.
"""

from __future__ import annotations

from typing import Any

import torch

MIN_POSITIONS = 1024  # the first table's length (doubled as positions need)


def static(rotary: Any) -> bool:
    """Whether ``rotary``'s rows depend on the position alone (its frequencies are not recomputed per call)."""
    kind = getattr(rotary, "rope_type", None)
    return isinstance(kind, str) and "dynamic" not in kind and kind != "longrope" and isinstance(
        getattr(rotary, "inv_freq", None), torch.Tensor
    )


class RopeTable:
    """cos/sin rows of ``rotary`` (a transformers rotary-embedding module) for positions, in fp32.

    A lookup for activations of ``dtype`` rounds the rows to it as the module itself does, then holds
    them in fp32, so it equals ``rotary(x, positions)`` for an ``x`` of that dtype, converted to fp32, up
    to the last bit of a vectorized ``cos``/``sin``.
    """

    def __init__(self, rotary: Any):
        self.rotary = rotary
        self._key: tuple[Any, ...] | None = None
        self._cos = torch.empty(0)  # [P, D]
        self._sin = torch.empty(0)  # [P, D]

    def _state(self, dtype: torch.dtype) -> tuple[Any, ...]:
        inv = self.rotary.inv_freq
        return dtype, inv.data_ptr(), inv._version, inv.dtype, float(getattr(self.rotary, "attention_scaling", 1.0))

    def tables(self, positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # [P, D] each
        """The whole fp32 cos and sin tables for activations in ``dtype``, covering at least positions
        ``0..positions - 1`` (``P >= positions``), contiguous."""
        key = self._state(dtype)
        if key != self._key or positions > self._cos.shape[0]:
            size = max(MIN_POSITIONS, self._cos.shape[0] if key == self._key else 0)
            while size < positions:
                size *= 2
            probe = torch.empty(1, 1, 1, dtype=dtype, device=self.rotary.inv_freq.device)  # dtype, device only
            cos, sin = self.rotary(probe, torch.arange(size, device=probe.device)[None])  # [1, size, D] each
            self._cos, self._sin = cos[0].float().contiguous(), sin[0].float().contiguous()
            self._key = key
        return self._cos, self._sin

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # [n, D] each
        """fp32 cos and sin rows for ``positions`` (int64 ``[n]``) of activations in ``dtype``, contiguous."""
        cos, sin = self.tables(int(positions.max()) + 1 if positions.numel() else 1, dtype)
        return cos[positions], sin[positions]
