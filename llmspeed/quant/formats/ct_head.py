"""An int8 output head through a compressed-tensors folder, and back to llmspeed as the same int8 head.

The export writes a quantized output head as its dequantized rows, in float and in ``ignore`` (through the tied
embedding when the embedding reads the head's rows, ``share_embedding``): transformers' ``dequantize=True`` path
decompresses every dense layer with one config group's scheme, so an int8 head beside int4 layers would load with
the int4 scheme (an asymmetric int4 folder, which needs that path, would not load at all), and vLLM reads a quantized
``lm_head`` only since its compressed-tensors config handles ``ParallelLMHead`` (2026). Those rows are the float
image of an int8 per-channel head, so the export also records, in the safetensors metadata under :data:`KEY` (which
other readers ignore), the head's config and per-row fp32 scales; :func:`restore` rebuilds the int8 head from
the stored rows and those scales when they reproduce the rows exactly, so ``llmspeed.load`` gives back the model
that was saved (its int8 head, its shared embedding, its logits bit for bit, its memory footprint). Rows that do
not (the folder was edited) load as stored, in float.
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
from ..modules import Int8Linear
from . import skeleton

KEY = "llmspeed.int8_head"


def record(name: str, head: Int8Linear, embedding: str | None) -> dict[str, str]:
    """``{KEY: JSON}``: safetensors metadata for ``head`` at ``name``, written as its float rows (through input
    embedding ``embedding`` when that reads the head's rows)."""
    scales = head.scales.detach().cpu().float().numpy().astype("<f4")  # [out]
    data = {"layer": name, "config": head.config.to_dict(), "embedding": embedding,
            "scales": base64.b64encode(scales.tobytes()).decode("ascii")}  # fmt: skip
    return {KEY: json.dumps(data)}


def restore(model: Model, tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: Path) -> None:
    """Put back the int8 head :func:`record` describes, from its float rows in ``tensors`` (popped once used), when
    its codes times its scales are those rows exactly; with ``embedding``, that embedding reads the head's rows again.

    Raises:
        ValueError: the metadata under :data:`KEY` is unreadable (names the file and the key).
    """
    if KEY not in metadata:
        return
    try:
        data = json.loads(metadata[KEY])
        name, embedding, config = data["layer"], data["embedding"], QuantConfig.from_dict(data["config"])
        raw = base64.b64decode(data["scales"], validate=True)
        scales = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))  # [out]
        if not isinstance(name, str) or not (embedding is None or isinstance(embedding, str)) or config.format != "int8":
            raise TypeError(f"layer {name!r}, embedding {embedding!r}, format {config.format!r}")
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        raise ValueError(f"{source}: metadata {KEY!r} is unreadable ({err}); save the model again") from err
    rows = tensors.get(f"{embedding or name}.weight")  # [vocab, hidden]
    names = {id(m): n for n, m in model.hf.named_modules()}
    if (rows is None or rows.dim() != 2 or not rows.is_floating_point() or name not in model.linear_names()
            or tuple(scales.shape) != rows.shape[:1]
            or embedding not in (None, names.get(id(model.hf.get_input_embeddings())))):  # fmt: skip
        return
    codes = torch.where(scales[:, None] != 0, rows.float() / scales[:, None], 0).round().clamp(-127, 127)
    codes = codes.to(torch.int8)  # [out, in]
    if not torch.equal(P.dequantize_int8(codes, scales).to(rows.dtype), rows):
        return  # not the rows the export wrote: the float head, as stored
    module = skeleton.install(model, name, config, bias=f"{name}.bias" in tensors)
    want = {f"{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()}
    skeleton.assign(model, f"{name}.qweight", codes, source, want)
    skeleton.assign(model, f"{name}.scales", scales, source, want)
    tensors.pop(f"{name}.weight", None)
    if embedding is not None:
        del tensors[f"{embedding}.weight"]
        share_tied_embedding(model, name)
