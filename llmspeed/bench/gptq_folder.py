"""Write a GPTQ folder in the published layout (AutoGPTQ's ``pack``), to test and benchmark ``llmspeed.load``.

llmspeed reads GPTQ checkpoints but does not write them; this writer exists so the reader can be checked
against folders built independently of it, with act-order (``desc_act``) groups, v1 or v2 zero points,
symmetric or not. It follows the layout AutoGPTQ/GPTQModel publish, written with explicit bit shifts
(the reader uses byte views), and rounds to nearest per group instead of running GPTQ: the file layout
is what is under test, not the codes' quality.

Per linear ``<name>`` (``in`` inputs, ``out`` outputs, ``G = ceil(in / group)`` groups)::

    qweight int32 [in / 8, out]   input 8w + i at bits 4i of word w
    qzeros  int32 [G, out / 8]    output 8w + i at bits 4i; v1 stores zero - 1, v2 stores zero
    scales  float16 [G, out]      g_idx int32 [in]: the group of each input column
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..protocol import CausalLM
from .foreign_folder import write_foreign_folder


def _pack_rows(values: torch.Tensor) -> torch.Tensor:  # [n / 8, m] int32
    """Pack 4-bit ``values`` [n, m] (ints in [0, 15]) eight per int32 along axis 0, low bits first."""
    v = values.to(torch.int64)
    words = torch.zeros(v.shape[0] // 8, v.shape[1], dtype=torch.int64)
    for i in range(8):
        words |= v[i::8] << (4 * i)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32's range
    return words.to(torch.int32)


def unpack_rows(words: torch.Tensor) -> torch.Tensor:  # [8 n, m] int64
    """Inverse of :func:`_pack_rows` with explicit shifts (the tests' oracle)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(w.shape[0] * 8, w.shape[1], dtype=torch.int64)
    for i in range(8):
        out[i::8] = (w >> (4 * i)) & 15
    return out


def gptq_layer(
    weight: torch.Tensor, group: int, act_order: bool, sym: bool, version: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of ``weight`` [out, in], rounded to nearest per group."""
    out_f, in_f = weight.shape
    perm = torch.randperm(in_f, generator=generator) if act_order else torch.arange(in_f)  # visiting order
    g_idx = torch.empty(in_f, dtype=torch.int64)
    g_idx[perm] = torch.arange(in_f) // group  # groups are runs of the visiting order
    n_groups = -(-in_f // group)  # AutoGPTQ's ceil: the last group of the visiting order is shorter
    w = F.pad(weight.detach().float()[:, perm], (0, n_groups * group - in_f))  # [out, G group]: zeros pad
    w = w.reshape(out_f, n_groups, group)  # [out, G, group] (a zero changes neither range nor absmax)
    if sym:
        scales = (w.abs().amax(-1) / 7.5).clamp_min(1e-8).half()  # [out, G]
        zeros = torch.full_like(scales, 8, dtype=torch.float32)
    else:
        lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
        scales = ((hi - lo) / 15).clamp_min(1e-8).half()
        zeros = torch.round(-lo / scales.float()).clamp(0, 15)
    if version == 1:
        zeros = zeros.clamp_min(1)  # v1 stores zero - 1 as an unsigned nibble: zero 0 cannot be written
    q = torch.round(w / scales.float()[..., None]) + zeros[..., None]  # [out, G, group]
    codes_p = q.clamp(0, 15).reshape(out_f, -1)[:, :in_f]  # [out, in]
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p  # back to the original column order
    return {
        "qweight": _pack_rows(codes.T),  # [in / 8, out]
        "qzeros": _pack_rows(zeros - (1 if version == 1 else 0)).T.contiguous(),  # [out/8, G] -> [G, out / 8]
        "scales": scales.T.contiguous(),  # [G, out]
        "g_idx": g_idx.to(torch.int32),
    }


def write_gptq_folder(
    model: CausalLM,
    path: str | Path,
    group: int = 32,
    act_order: bool = True,
    sym: bool = False,
    version: int = 1,
    seed: int = 0,
) -> Path:
    """Write the float ``model``'s linears (all but the output head) as a 4-bit GPTQ folder at ``path``."""
    gen = torch.Generator().manual_seed(seed)
    config = {
        "quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": sym,
        "checkpoint_format": "gptq" if version == 1 else "gptq_v2", "true_sequential": True, "damp_percent": 0.01,
    }  # fmt: skip
    return write_foreign_folder(model, path, lambda w: gptq_layer(w, group, act_order, sym, version, gen), config)


def dequantize_layer(tensors: dict[str, torch.Tensor], name: str, version: int) -> torch.Tensor:  # [out, in]
    """The float weight a GPTQ layer stands for, from its raw tensors: ``(q - z[g_idx]) * s[g_idx]``."""
    q = unpack_rows(tensors[f"{name}.qweight"]).T  # [out, in]
    z = unpack_rows(tensors[f"{name}.qzeros"].T).float() + (1 if version == 1 else 0)  # [out, G]
    s = tensors[f"{name}.scales"].T.float()  # [out, G]
    g = tensors[f"{name}.g_idx"].long()  # [in]
    return (q.float() - z[:, g]) * s[:, g]
