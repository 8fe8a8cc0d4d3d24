"""compressed-tensors ``pack-quantized`` folders: what transformers and vLLM load, written and read here.

Layout of one quantized linear ``<name>`` (compressed-tensors 0.20, ``format: "pack-quantized"``):

* ``<name>.weight_packed`` int32 ``[out, ceil(in * bits / 32)]``: signed codes ``q`` plus ``2^(bits-1)``,
  element ``i`` of a row at bits ``i * bits`` of the little-endian row (4 bits: eight per word,
  8 bits: four per word). For int4 the bytes of a row are exactly llmspeed's nibble packing of
  ``code = q + 8`` (even element in the low nibble), so ``qweight`` is a byte view of it.
* ``<name>.weight_scale`` float ``[out, groups]`` (group strategy) or ``[out, 1]`` (channel).
* ``<name>.weight_zero_point`` int32 ``[ceil(out * bits / 32), groups]``, asymmetric only: signed zero
  points plus 8, packed along the *output* axis.
* ``<name>.weight_shape`` int64 ``[2]``: ``[out, in]``.

Dequantization is ``(q - zp) * scale``; with llmspeed's ``code = q + 8`` and ``zero = zp + 8`` that is
``(code - zero) * scale``, llmspeed's int4 formula, and symmetric folders have ``zero = 8``. int8
per-channel ``Int8Linear`` codes are ``q`` with ``zp = 0``. Scales are written in fp32, llmspeed's own
precision, so the folder decodes to exactly llmspeed's dequantized weights; engines cast them to the
model dtype. ``config.json`` gets a ``quantization_config`` with ``quant_method: "compressed-tensors"``,
one config group per distinct layer config (targets ``["Linear"]`` when there is one) and every float
linear in ``ignore``. The output head is always written in float (a quantized one as its dequantized rows,
through the tied embedding when the two are shared) and listed in ``ignore``, as every reader of the format takes
it; an int8 head is also recorded in the file's metadata, from which ``llmspeed.load`` rebuilds it (:mod:`.ct_head`).
Layers quantized with ``hadamard`` are described by a ``transform_config`` (:mod:`.ct_transforms`).

Reading (:func:`load`, with its checks) is in :mod:`.ct_load`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ...protocol import CausalLM, base_linear
from ..config import QuantConfig
from ..embedding import shared_embeddings
from ..modules import Int4Linear, Int8Linear, QuantizedLinearBase
from . import ct_head, ct_transforms
from .ct_load import (  # noqa: F401  (the reading side, importable from here as before the split)
    PACK_FORMAT,
    check_readable,
    check_targets,
    group_config,
    layer_config,
    load,
    module_buffers,
)
from .files import save_tokenizer, start_folder
from .packing import pack_int4, pack_int8

QUANT_METHOD = "compressed-tensors"
WEIGHTS = "model.safetensors"


# --- export ------------------------------------------------------------------------------------------
def _refusal(name: str, module: nn.Module) -> str | None:
    """Why the layer at ``name`` cannot be written in this format, or ``None``."""
    if base_linear(module) is not module:
        return (
            f"layer {name!r} carries LoRA adapters, which compressed-tensors cannot hold: save them as PEFT "
            f"files with lora.save_adapter (vLLM serves those next to the base, --enable-lora) and export the "
            f"base without them (lora.delete_adapter), or merge them in and take the wrappers off "
            f"(lora.merge_and_unload)"
        )
    if not isinstance(module, QuantizedLinearBase):
        return None
    cfg = module.config
    if cfg.format == "nf4":
        return (
            f"layer {name!r} is NF4, which compressed-tensors has no format for: quantize with "
            f"format='int4' (symmetric=True for vLLM's fastest kernels), or keep format='llmspeed'"
        )
    if cfg.act_order:
        return (
            f"layer {name!r} has permuted input columns (a GPTQ desc_act checkpoint); keep format='llmspeed'"
        )
    if cfg.activations != "float":
        return (
            f"layer {name!r} has activations={cfg.activations!r} (llmspeed's dynamic int8 activations in blocks of "
            f"32), which this export does not describe to vLLM; quantize with activations='float' for export"
        )
    g = cfg.group_size
    if g is not None and module.in_features % g:
        return (
            f"layer {name!r} has in_features={module.in_features}, not a multiple of group_size={g}; "
            f"compressed-tensors and vLLM need whole groups: quantize with a group size that divides it, "
            f"or keep format='llmspeed'"
        )
    zeros = getattr(module, "zeros", None)
    if isinstance(zeros, torch.Tensor) and not bool(torch.all(zeros == zeros.round())):
        integer_methods = ("rtn", "gptq", "awq", "awq+gptq")
        if cfg.method in integer_methods:  # these choose integer zero points: learned (QAT) or read from GGUF
            return (
                f"layer {name!r} has fractional zero points (learned by llmspeed.qat.prepare(..., learn_scales=True) "
                f"from a {cfg.method!r} start, or read from a GGUF file's Q4_1 or Q4_K blocks), which compressed-tensors "
                f"stores as integers: prepare with learn_scales=False or symmetric=True (zero point fixed at 8), "
                f"take a Q4_0 GGUF file (symmetric: exported as it is), or keep format='llmspeed'"
            )
        return (
            f"layer {name!r} has fractional zero points (method {cfg.method!r}, e.g. HQQ), which compressed-tensors "
            f"stores as integers: quantize with method='rtn', 'gptq', 'awq' or 'awq+gptq', or keep format='llmspeed'"
        )
    return None


def _scheme(cfg: QuantConfig) -> dict[str, Any]:
    bits = 8 if cfg.format == "int8" else 4
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": bool(cfg.symmetric),
        "strategy": "channel" if cfg.group_size is None else "group",
        "group_size": cfg.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return {"targets": [], "weights": weights, "input_activations": None, "output_activations": None,
            "format": PACK_FORMAT}  # fmt: skip


def _module_tensors(name: str, module: QuantizedLinearBase) -> dict[str, torch.Tensor]:
    out, k = module.out_features, module.in_features
    tensors = {f"{name}.weight_shape": torch.tensor([out, k], dtype=torch.int64)}
    if isinstance(module, Int8Linear):
        tensors[f"{name}.weight_packed"] = pack_int8(module.qweight.cpu())
        scales = module.scales.detach().float().cpu()  # [out] (per row) or [out, groups]
        tensors[f"{name}.weight_scale"] = scales.reshape(out, -1).contiguous()
    else:
        assert isinstance(module, Int4Linear)
        codes = module.codes().cpu()[:, :k]  # [out, in] uint8
        tensors[f"{name}.weight_packed"] = pack_int4(codes)
        tensors[f"{name}.weight_scale"] = module.scales.detach().float().cpu().contiguous()  # [out, groups]
        if not module.config.symmetric:
            zeros = module.zeros.detach().cpu().to(torch.uint8)  # [out, groups] in [0, 15]
            tensors[f"{name}.weight_zero_point"] = pack_int4(zeros.T.contiguous()).T.contiguous()
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
    return tensors


def save(model: CausalLM, directory: str | Path) -> Path:
    """Write ``model`` as a compressed-tensors ``pack-quantized`` folder (see the module docstring)."""
    from safetensors.torch import save_file

    root = model.module
    layers = dict(model.linear_layers())
    for name, module in layers.items():
        reason = _refusal(name, module)
        if reason is not None:
            raise ValueError(f"cannot save format='compressed-tensors': {reason}")
    quantized = {n: m for n, m in layers.items() if isinstance(m, QuantizedLinearBase)}
    get_head = getattr(root, "get_output_embeddings", None)
    head_module = get_head() if callable(get_head) else None
    heads = {n: quantized.pop(n) for n in list(quantized) if quantized[n] is head_module}  # written in float
    if not quantized:
        raise ValueError(
            "cannot save format='compressed-tensors': the model has no quantized layer; quantize it first "
            "(llmspeed.quantize(model, 'int4', symmetric=True)) or save a float model with format='llmspeed'"
        )
    config = getattr(root, "config", None)
    if config is None:
        raise ValueError("cannot save format='compressed-tensors': the model has no transformers config")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    prefixes = tuple(f"{n}." for n in [*quantized, *heads])
    for name, tensor in root.state_dict().items():
        if name.startswith(prefixes):
            continue
        # the same tensor, not merely the same storage (views of one buffer are distinct weights), as the native save
        same = (str(tensor.device), tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if same in seen:  # tied weights: transformers stores the first and re-ties from the config
            continue
        seen.add(same)
        tensors[name] = tensor.detach().cpu().contiguous()
    for name, module in quantized.items():
        tensors.update(_module_tensors(name, module))
    rotated = {n: cast(int, m.config.group_size) for n, m in quantized.items() if m.config.hadamard}
    transform_config, transform_tensors = ct_transforms.describe(rotated)  # hadamard_layers: SpinQuant's R4 shape
    tensors.update(transform_tensors)
    dtype = model.spec.dtype
    shared = shared_embeddings(model)
    for embedding, head in shared.items():  # a dense embedding: the head's rows, as llmspeed reads them
        tensors[f"{embedding}.weight"] = heads[head].dequantize(dtype).cpu().contiguous()
    for name, module in heads.items():  # a float output head, as every reader takes it: the head's dequantized rows
        if name not in shared.values():
            tensors[f"{name}.weight"] = module.dequantize(dtype).cpu().contiguous()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
    groups: dict[QuantConfig, list[str]] = {}
    for name, module in quantized.items():
        key = QuantConfig(module.config.format, module.config.group_size, symmetric=module.config.symmetric)
        groups.setdefault(key, []).append(name)
    config_groups = {}
    for i, (cfg, names) in enumerate(groups.items()):
        scheme = _scheme(cfg)
        scheme["targets"] = ["Linear"] if len(groups) == 1 else sorted(names)
        config_groups[f"group_{i}"] = scheme
    get_emb = getattr(root, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    tied = bool(shared) or (isinstance(head_module, nn.Linear) and emb is not None and head_module.weight is emb.weight)
    directory = Path(directory)
    start_folder(root, directory)
    metadata = {"format": "pt"}
    for name, module in heads.items():  # a quantized head, rebuilt from its rows by llmspeed.load (others skip it)
        metadata.update(ct_head.record(name, module, next((e for e, h in shared.items() if h == name), None)))
    save_file(tensors, str(directory / WEIGHTS), metadata=metadata)
    config.save_pretrained(directory)
    data = json.loads((directory / "config.json").read_text())
    data["tie_word_embeddings"] = bool(tied)
    data["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format": PACK_FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(set(layers) - set(quantized)),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": transform_config,
        "global_compression_ratio": None,
        "version": "0.20.1",
    }
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, directory)
    return directory
