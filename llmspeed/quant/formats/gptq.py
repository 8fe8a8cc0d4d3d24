"""GPTQ folders (AutoGPTQ / GPTQModel / optimum): 4-bit ``qweight``/``qzeros``/``scales``/``g_idx``, read here.

Layout of one quantized linear ``<name>`` (``in`` input, ``out`` output features, ``G`` groups):

* ``<name>.qweight`` int32 ``[in / 8, out]``: eight unsigned 4-bit codes per word along the *input*
  axis, input ``8 w + i`` at bits ``4 i``. Transposed to ``[out, in / 8]``, the little-endian bytes of a
  row are llmspeed's nibble packing (even input in the low nibble).
* ``<name>.qzeros`` int32 ``[G, out / 8]``: zero points packed the same way along the *output* axis.
  Checkpoint format v1 (``checkpoint_format: "gptq"``, AutoGPTQ) stores ``zero - 1``; v2
  (``"gptq_v2"``, GPTQModel) stores ``zero``.
* ``<name>.scales`` float16 ``[G, out]``; ``<name>.g_idx`` int32 ``[in]``: the group of each input column;
  ``<name>.bias`` optional. ``G = ceil(in / group)``: when the group size does not divide ``in`` (SmolLM2's 576
  at the usual 128), the last group is shorter, and llmspeed pads it with the code of 0.0 as its own layout does.

``w[:, c] = (code[:, c] - zero[g_idx[c]]) * scale[g_idx[c]]``. Without ``desc_act`` ``g_idx[c] = c // group``
(llmspeed's layout). With ``desc_act`` the groups are runs of the columns sorted by ``g_idx``: the
reader stores the codes in that order and the module's ``perm`` (``QuantConfig.act_order``) gathers
the input to match, so the kernels run unchanged and no float weight is ever built. GPTQModel's ``dynamic``
per-layer rules give a layer its own ``group_size`` or ``sym`` (:func:`layer_settings`; other bit widths are refused).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ...model import Model
from .. import primitives as P
from ..config import QuantConfig
from . import skeleton
from .files import config_dtype, quantization_config, read_config
from .packing import little_endian_bytes, unpack_int4


def quantize_config(directory: Path) -> tuple[dict[str, Any], Path]:
    """The GPTQ settings and the file holding them: ``config.json``'s ``quantization_config``, else
    ``quantize_config.json`` (so that an error about a setting names the file to fix)."""
    quant = quantization_config(directory)
    if quant is None:
        raise ValueError(f"{directory} has no GPTQ quantization_config")
    in_config = read_config(directory).get("quantization_config") is not None
    return quant, directory / ("config.json" if in_config else "quantize_config.json")


def _settings(quant: dict[str, Any], source: Path, where: str = "") -> tuple[int | None, bool, int]:
    """``(group_size, symmetric, zero offset)`` of the folder (or, ``where`` naming it, of one layer), validated."""
    bits = quant.get("bits")
    if bits != 4:
        raise ValueError(f"{source}: GPTQ bits={bits!r}{where}; llmspeed reads 4-bit GPTQ checkpoints")
    g = quant.get("group_size", 128)
    if isinstance(g, bool) or not isinstance(g, int) or (g != -1 and g <= 0):
        raise ValueError(f"{source}: GPTQ group_size={g!r}{where}; it must be a positive integer or -1")
    fmt = quant.get("checkpoint_format", quant.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(
            f"{source}: GPTQ checkpoint_format={fmt!r}; llmspeed reads 'gptq' (v1) and 'gptq_v2'"
        )
    return (None if g == -1 else g), bool(quant.get("sym", True)), (1 if fmt == "gptq" else 0)


def layer_settings(quant: dict[str, Any], name: str, source: Path) -> tuple[int | None, bool, int]:
    """:func:`_settings` of layer ``name``: the folder's, with the first GPTQModel ``dynamic`` rule whose pattern
    matches ``name`` from its start applied (``"+:pattern"`` or ``"pattern"``: its ``bits``, ``group_size``, ``sym``
    replace the folder's; ``"-:pattern"``: the layer stays in float), as vLLM's ``get_dynamic_override`` reads it."""
    dynamic = quant.get("dynamic") or {}
    if not isinstance(dynamic, dict) or not all(isinstance(r, dict) for r in dynamic.values()):
        raise ValueError(f"{source}: GPTQ dynamic must map module patterns to objects of settings; got {dynamic!r}")
    for pattern, rule in dynamic.items():
        try:
            matched = re.match(pattern[2:] if pattern.startswith(("-:", "+:")) else pattern, name)
        except re.error as err:
            raise ValueError(f"{source}: GPTQ dynamic pattern {pattern!r} is not a regular expression ({err})") from err
        if matched and pattern.startswith("-:"):
            raise ValueError(f"{source}: layer {name!r} has GPTQ tensors, but dynamic rule {pattern!r} leaves it in float")
        if matched:
            return _settings({**quant, **rule}, source, f" (dynamic rule {pattern!r} for layer {name!r})")
    return _settings(quant, source)


def layer_buffers(
    name: str, in_f: int, out_f: int, group: int | None, sym: bool, offset: int, tensors: dict, source: Path
) -> tuple[QuantConfig, dict[str, torch.Tensor]]:
    """The module config and buffers of GPTQ layer ``name`` (its tensors are popped from ``tensors``)."""
    g = in_f if group is None else group
    if in_f % 8 or out_f % 8:
        raise ValueError(f"{source}: layer {name!r} is [{out_f}, {in_f}]; GPTQ packs both in multiples of 8")
    n_groups = -(-in_f // g)  # the last group is partial when g does not divide in (AutoGPTQ's ceil)
    qweight = skeleton.take(tensors, f"{name}.qweight", (torch.int32,), (in_f // 8, out_f), source, "GPTQ")
    qzeros = skeleton.take(tensors, f"{name}.qzeros", (torch.int32,), (n_groups, out_f // 8), source, "GPTQ")
    scales = skeleton.take(tensors, f"{name}.scales", (torch.float16, torch.bfloat16, torch.float32),
                           (n_groups, out_f), source, "GPTQ")  # fmt: skip
    g_idx = tensors.pop(f"{name}.g_idx", None)
    plain = torch.arange(in_f, dtype=torch.int64) // g  # [in]
    if g_idx is None:
        g_idx = plain
    elif g_idx.dtype not in (torch.int32, torch.int64) or tuple(g_idx.shape) != (in_f,):
        raise ValueError(
            f"{source}: tensor {name + '.g_idx'!r} is {g_idx.dtype} {list(g_idx.shape)}; GPTQ needs int32 [{in_f}]"
        )
    g_idx = g_idx.long()
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ValueError(f"{source}: tensor {name + '.g_idx'!r} holds groups outside [0, {n_groups})")
    zeros = unpack_int4(qzeros, out_f).T.float() + offset  # [out, groups]
    if offset and bool((zeros > 15).any()):
        raise ValueError(
            f"{source}: {name + '.qzeros'!r} holds a v1 zero of 15 (16 after the +1); is it gptq_v2?"
        )
    packed = qweight.T.contiguous()  # [out, in / 8] int32
    act_order = not torch.equal(g_idx, plain)
    perm = None
    if act_order:
        perm = torch.argsort(g_idx, stable=True)  # [in]: packed column j is input column perm[j]
        if not torch.equal(g_idx[perm], plain):
            raise ValueError(
                f"{source}: tensor {name + '.g_idx'!r} gives groups of unequal sizes; llmspeed needs {g} columns per "
                f"group (the last one may be shorter)"
            )
    if perm is None and in_f % g == 0:
        qbytes = little_endian_bytes(packed)  # [out, in / 2]: already llmspeed's nibble order
    else:
        codes = unpack_int4(packed, in_f)  # [out, in] uint8
        if perm is not None:
            codes = codes[:, perm]  # groups now contiguous
        pad = zeros[:, -1:].to(torch.uint8).expand(out_f, n_groups * g - in_f)  # the code of 0.0 fills the last group
        qbytes = P.pack_nibbles(torch.cat([codes, pad], dim=1))  # [out, in_pad / 2]
    symmetric = sym and bool((zeros == P.SYMMETRIC_ZERO).all())
    cfg = QuantConfig("int4", group, symmetric=symmetric, act_order=act_order, method="gptq")
    buffers = {"qweight": qbytes, "scales": scales.T.to(P.SCALE_DTYPE).contiguous(),  # GPTQ's own fp16
               "zeros": zeros.to(P.SCALE_DTYPE).contiguous()}
    if perm is not None:
        buffers["perm"] = perm
    return cfg, buffers


def load(directory: Path, device: str | torch.device = "cpu") -> Model:
    """Read a 4-bit GPTQ folder into llmspeed's ``Int4Linear`` modules (act-order ones with ``perm``)."""
    quant, quant_file = quantize_config(directory)
    _settings(quant, quant_file)  # the folder's own settings, checked before any tensor is read

    def layer(name: str, lin: Any, tensors: dict) -> tuple[QuantConfig, dict[str, torch.Tensor]]:
        group, sym, offset = layer_settings(quant, name, quant_file)
        return layer_buffers(name, lin.in_features, lin.out_features, group, sym, offset, tensors, directory)

    return skeleton.load_packed(directory, config_dtype(read_config(directory)), device, "GPTQ", layer)
