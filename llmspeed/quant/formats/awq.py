"""AutoAWQ folders (``quant_method: "awq"``, ``version: "gemm"``, what AutoAWQ and llm-compressor's AWQ export wrote
for most AWQ models on the Hugging Face Hub, and what vLLM serves as ``awq``), read here.

Layout of one quantized linear ``<name>`` (``in`` input, ``out`` output features, ``G = in / group`` groups):

* ``<name>.qweight`` int32 ``[in, out / 8]``: eight unsigned 4-bit codes per word along the *output* axis, in
  AutoAWQ's interleaved order: the nibble at bits ``4 i`` of word ``w`` is output ``8 w + ORDER[i]``,
  ``ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``;
* ``<name>.qzeros`` int32 ``[G, out / 8]``: the zero points, packed the same way;
* ``<name>.scales`` float16 ``[G, out]``; ``<name>.bias`` optional.

``w[o, c] = (code[c, o] - zero[c // group, o]) * scale[c // group, o]``: llmspeed's asymmetric int4 with the
group along the input, so the codes are unpacked, transposed and packed as ``Int4Linear`` keeps them; scales and
zero points are stored as they are (fp16). ``modules_to_not_convert`` layers stay in float. Other AWQ versions
(``gemv``, ``gemv_fast``, ``marlin``, ...) pack differently and are refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...model import Model
from .. import primitives as P
from ..config import QuantConfig
from . import skeleton
from .files import config_dtype, quantization_config, read_config

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the nibble at bits 4 i of a word holds output 8 w + ORDER[i]


def unpack_columns(words: torch.Tensor, n: int) -> torch.Tensor:  # [r, n] uint8
    """The 4-bit codes of ``words`` int32 ``[r, n / 8]``, in output order (AutoAWQ's interleaving undone)."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # [r, n / 8]
    nibbles = (w[:, :, None] >> torch.arange(0, 32, 4)) & 15  # [r, n / 8, 8]: nibble i of each word
    codes = torch.empty_like(nibbles)
    codes[:, :, list(ORDER)] = nibbles
    return codes.reshape(w.shape[0], -1)[:, :n].to(torch.uint8)


def settings(quant: dict[str, Any], source: Path) -> int:
    """The folder's group size, after checking that it is 4-bit GEMM-packed AWQ with zero points."""
    bits = quant.get("bits", quant.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{source}: AWQ bits={bits!r}; llmspeed reads 4-bit AWQ checkpoints")
    version = quant.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise ValueError(f"{source}: AWQ version={version!r}; llmspeed reads 'gemm' (AutoAWQ's default packing): "
                         f"the other versions order their words differently")  # fmt: skip
    if quant.get("zero_point", True) is not True:
        raise ValueError(f"{source}: AWQ zero_point={quant.get('zero_point')!r}; the GEMM layout stores zero points "
                         f"(zero_point: true)")  # fmt: skip
    g = quant.get("group_size", quant.get("q_group_size", 128))
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
        raise ValueError(f"{source}: AWQ group_size={g!r}; it must be a positive integer")
    return g


def layer_buffers(name: str, in_f: int, out_f: int, group: int, tensors: dict,
                  source: Path) -> tuple[QuantConfig, dict[str, torch.Tensor]]:  # fmt: skip
    """The module config and buffers of AWQ layer ``name`` (its tensors are popped from ``tensors``)."""
    if out_f % 8 or in_f % 2 or in_f % group:
        raise ValueError(f"{source}: layer {name!r} is [{out_f}, {in_f}]; AWQ needs out a multiple of 8 and in "
                         f"divisible by group_size={group}")  # fmt: skip
    n_groups = in_f // group
    qweight = skeleton.take(tensors, f"{name}.qweight", (torch.int32,), (in_f, out_f // 8), source, "AWQ")
    qzeros = skeleton.take(tensors, f"{name}.qzeros", (torch.int32,), (n_groups, out_f // 8), source, "AWQ")
    scales = skeleton.take(tensors, f"{name}.scales", (torch.float16, torch.bfloat16, torch.float32),
                           (n_groups, out_f), source, "AWQ")  # fmt: skip
    codes = unpack_columns(qweight, out_f).T.contiguous()  # [out, in]
    zeros = unpack_columns(qzeros, out_f).T.float()  # [out, groups]
    cfg = QuantConfig("int4", group, symmetric=bool((zeros == P.SYMMETRIC_ZERO).all()), method="awq")
    return cfg, {"qweight": P.pack_nibbles(codes), "scales": scales.T.to(P.SCALE_DTYPE).contiguous(),
                 "zeros": zeros.to(P.SCALE_DTYPE).contiguous()}  # fmt: skip


def load(directory: Path, device: str | torch.device = "cpu") -> Model:
    """Read a 4-bit AWQ (GEMM) folder into llmspeed's ``Int4Linear`` modules."""
    quant = quantization_config(directory)
    assert quant is not None  # detect() said "awq"
    group = settings(quant, directory / "config.json")  # checked before any tensor is read

    def layer(name: str, lin: Any, tensors: dict) -> tuple[QuantConfig, dict[str, torch.Tensor]]:
        return layer_buffers(name, lin.in_features, lin.out_features, group, tensors, directory)

    return skeleton.load_packed(directory, config_dtype(read_config(directory)), device, "AWQ", layer)


__all__ = ["ORDER", "layer_buffers", "load", "settings", "unpack_columns"]
