"""Write an AutoAWQ (GEMM) folder in the published layout (AutoAWQ's ``WQLinear_GEMM.from_linear``), to test and
benchmark ``llmspeed.load``.

llmspeed reads AWQ checkpoints but does not write them; this writer builds folders independently of the reader,
with explicit bit shifts (the reader uses a gather), and rounds to nearest per group instead of running AWQ: the
file layout is what is under test. Per linear ``<name>`` (``in`` inputs, ``out`` outputs, ``G = in / group``)::

    qweight int32 [in, out / 8]   output 8w + ORDER[i] at bits 4i of word w, ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
    qzeros  int32 [G, out / 8]    the zero points, packed the same way
    scales  float16 [G, out]
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..protocol import CausalLM
from .foreign_folder import write_foreign_folder

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_columns(values: torch.Tensor) -> torch.Tensor:  # [r, m / 8] int32
    """Pack 4-bit ``values`` [r, m] (ints in [0, 15]) eight per int32 along axis 1 in AutoAWQ's order."""
    v = values.to(torch.int64)
    words = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for i, column in enumerate(ORDER):
        words |= v[:, column::8] << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement into int32


def awq_layer(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` of ``weight`` [out, in], asymmetric, rounded to nearest per group."""
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group, group)  # [out, G, group]
    lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
    scales = ((hi - lo) / 15).clamp_min(1e-8).half()  # [out, G]
    zeros = torch.round(-lo / scales.float()).clamp(0, 15)  # [out, G]
    codes = (torch.round(w / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15).reshape(out_f, in_f)
    return {"qweight": pack_columns(codes.T), "qzeros": pack_columns(zeros.T), "scales": scales.T.contiguous()}


def dequantize_layer(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:  # [out, in]
    """The float weight an AWQ layer stands for, from its raw tensors with explicit shifts: ``(q - z) * s``."""

    def unpack(words: torch.Tensor) -> torch.Tensor:  # [r, 8 m]
        w = words.to(torch.int64) & 0xFFFFFFFF
        out = torch.empty(w.shape[0], w.shape[1] * 8, dtype=torch.int64)
        for i, column in enumerate(ORDER):
            out[:, column::8] = (w >> (4 * i)) & 15
        return out

    q = unpack(tensors[f"{name}.qweight"]).T.float()  # [out, in]
    z = unpack(tensors[f"{name}.qzeros"]).T.float()  # [out, G]
    s = tensors[f"{name}.scales"].T.float()  # [out, G]
    group = q.shape[1] // s.shape[1]
    return (q - z.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)


def write_awq_folder(model: CausalLM, path: str | Path, group: int = 32, version: str = "gemm",
                     skip: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """Write the float ``model``'s linears (all but the output head and those whose name contains one of ``skip``,
    AutoAWQ's ``modules_to_not_convert``) as a 4-bit AWQ folder at ``path``."""
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": version,
              "modules_to_not_convert": list(skip) or None}  # fmt: skip
    return write_foreign_folder(model, path, lambda w: awq_layer(w, group), config, skip)
