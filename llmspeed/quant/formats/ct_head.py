"""A quantized output head (int8, or int4 with ``lm_head="int4"``) through a compressed-tensors folder, and back to
llmspeed as the same head.

The export writes a quantized output head as its dequantized rows, in float and in ``ignore`` (through the tied
embedding when the embedding reads the head's rows, ``share_embedding``): transformers' ``dequantize=True`` path
decompresses every dense layer with one config group's scheme, so an int8 head beside int4 layers would load with
the int4 scheme (an asymmetric int4 folder, which needs that path, would not load at all), and vLLM reads a quantized
``lm_head`` only since its compressed-tensors config handles ``ParallelLMHead`` (2026). Those rows are the float
image of a quantized head, so the export also records, in the safetensors metadata under :data:`KEY` (int8: per-row
fp32 scales) or :data:`KEY4` (int4: per-group fp16 scales and zero points, which other readers ignore), the head's
config and its scales; :func:`restore` rebuilds the head's codes from the stored rows and those scales when they
reproduce the rows exactly, so ``llmspeed.load`` gives back the model that was saved (its quantized head, its shared
embedding, its logits bit for bit, its memory footprint). Rows that do not (the folder was edited) load as stored,
in float; so do 4-bit heads in a rotated basis or with GPTQ's column order, which are not recorded.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import numpy as np
import torch

from ...model import Model
from .. import primitives as P
from ..config import QuantConfig
from ..embedding import share_tied_embedding
from ..modules import Int4Linear, Int8Linear, QuantizedLinearBase
from . import skeleton

KEY = "llmspeed.int8_head"
KEY4 = "llmspeed.int4_head"


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().cpu().float().numpy().astype("<f4").tobytes()).decode("ascii")


def _decode(text: object, shape: tuple[int, ...] | None = None) -> torch.Tensor:  # fp32: ``shape`` where it fits, else flat
    raw = base64.b64decode(str(text), validate=True)
    values = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
    return values.reshape(shape) if shape is not None and values.numel() == int(np.prod(shape)) else values


def record(name: str, head: QuantizedLinearBase, embedding: str | None) -> dict[str, str]:
    """Safetensors metadata for quantized head ``head`` at ``name``, written as its float rows (through input
    embedding ``embedding`` when that reads the head's rows): ``{KEY: JSON}`` for int8, ``{KEY4: JSON}`` for int4,
    nothing for a head that cannot be rebuilt from its rows and scales (a rotated basis, GPTQ's column order)."""
    data = {"layer": name, "config": head.config.to_dict(), "embedding": embedding}
    if isinstance(head, Int8Linear):
        return {KEY: json.dumps({**data, "scales": _encode(head.scales)})}
    if isinstance(head, Int4Linear) and not head.config.act_order and not head.config.hadamard:
        shape = list(head.scales.shape)  # [out, groups]
        return {KEY4: json.dumps({**data, "shape": shape, "scales": _encode(head.scales), "zeros": _encode(head.zeros)})}
    return {}


def restore(model: Model, tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: Path) -> None:
    """Put back the quantized head :func:`record` describes, from its float rows in ``tensors`` (popped once used),
    when its codes times its scales are those rows exactly; with ``embedding``, that embedding reads the head's rows
    again.

    Raises:
        ValueError: the metadata under :data:`KEY` or :data:`KEY4` is unreadable (names the file and the key).
    """
    for key, fmt in ((KEY, "int8"), (KEY4, "int4")):
        if key in metadata:
            _restore(model, tensors, metadata[key], key, fmt, source)


def _restore(model: Model, tensors: dict[str, torch.Tensor], text: str, key: str, fmt: str, source: Path) -> None:
    try:
        data = json.loads(text)
        name, embedding, config = data["layer"], data["embedding"], QuantConfig.from_dict(data["config"])
        if not isinstance(name, str) or not (embedding is None or isinstance(embedding, str)) or config.format != fmt:
            raise TypeError(f"layer {name!r}, embedding {embedding!r}, format {config.format!r}")
        if fmt == "int8":
            scales, zeros = _decode(data["scales"]), None  # [out]
        else:
            shape = tuple(int(n) for n in data["shape"])  # [out, groups]
            scales, zeros = _decode(data["scales"], shape), _decode(data["zeros"], shape)
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        raise ValueError(f"{source}: metadata {key!r} is unreadable ({err}); save the model again") from err
    rows = tensors.get(f"{embedding or name}.weight")  # [vocab, hidden]
    names = {id(m): n for n, m in model.hf.named_modules()}
    if (rows is None or rows.dim() != 2 or not rows.is_floating_point() or name not in model.linear_names()
            or scales.dim() != (1 if zeros is None else 2) or scales.shape[0] != rows.shape[0]
            or embedding not in (None, names.get(id(model.hf.get_input_embeddings())))):  # fmt: skip
        return
    built = _built(rows, scales, zeros, config)
    if built is None or not torch.equal(built.dequantize(rows.dtype), rows):
        return  # not the rows the export wrote: the float head, as stored
    module = skeleton.install(model, name, config, bias=f"{name}.bias" in tensors)
    want = {f"{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()}
    for k, v in built.state_dict().items():
        skeleton.assign(model, f"{name}.{k}", v, source, want)
    tensors.pop(f"{name}.weight", None)
    if embedding is not None:
        del tensors[f"{embedding}.weight"]
        share_tied_embedding(model, name)


def _built(rows: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           config: QuantConfig) -> Int8Linear | Int4Linear | None:  # fmt: skip
    """The quantized layer whose codes, chosen against ``scales`` (and ``zeros``), come nearest ``rows``; ``None``
    where the scales do not fit the rows' width."""
    if zeros is None:  # int8, per row
        codes = torch.where(scales[:, None] != 0, rows.float() / scales[:, None], 0).round().clamp(-127, 127)
        return Int8Linear.from_codes(codes.to(torch.int8), scales, config=config)
    group = config.group_size or rows.shape[1]
    if scales.shape[1] * group < rows.shape[1] or (scales.shape[1] - 1) * group >= rows.shape[1]:
        return None
    padded = P.pad_columns(rows.float(), scales.shape[1] * group)  # [out, in_pad]
    codes = P.quantize_int4(padded, scales, zeros, config.group_size)  # [out, in_pad]
    return Int4Linear.from_codes(codes, scales, zeros, config=config, in_features=rows.shape[1])
