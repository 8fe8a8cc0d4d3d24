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
through the tied embedding when the two are shared) and listed in ``ignore``: vLLM loads float heads only.
Layers quantized with ``hadamard`` are described by a ``transform_config`` (:mod:`.ct_transforms`).

Reading (:func:`load`) takes ``pack-quantized`` config groups with dense weights; other formats, other schemes
(:func:`group_config`), targets other than those :func:`check_targets` reads, and sparse folders (a
``sparsity_config`` other than ``"dense"``), are refused by name before any tensor is read;
Hadamard transforms of int4 layers within their groups load as ``hadamard`` layers, and any other transform
is refused before a layer is built.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ...model import Model
from ...protocol import CausalLM, base_linear
from .. import primitives as P
from ..config import QuantConfig
from ..embedding import shared_embeddings
from ..modules import Int4Linear, Int8Linear, QuantizedLinearBase
from . import ct_transforms, skeleton
from .files import config_dtype, read_all, read_config, start_folder
from .packing import little_endian_bytes, pack_int4, pack_int8, unpack_int4, unpack_int8

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
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
        tensors[f"{name}.weight_scale"] = module.scales.detach().float().cpu().reshape(out, 1).contiguous()
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
    seen: dict[int, str] = {}
    prefixes = tuple(f"{n}." for n in [*quantized, *heads])
    for name, tensor in root.state_dict().items():
        if name.startswith(prefixes):
            continue
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights: transformers stores the first and re-ties from the config
            continue
        seen[ptr] = name
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
    for name, module in heads.items():  # vLLM reads a float output head only: the head's dequantized rows
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
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
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
        model.tokenizer.save_pretrained(directory)
    return directory


# --- import ------------------------------------------------------------------------------------------
def _matches(name: str, targets: list[str]) -> bool:
    for t in targets:
        if t == "Linear" or t == name or (t.startswith("re:") and re.match(t[3:], name)):
            return True
    return False


_TARGET_FORMS = "'Linear', 're:<pattern>' matching linear layers, and names of linear layers"


def check_targets(directory: Path, quant: dict[str, Any], linears: set[str]) -> None:
    """``ValueError`` naming the config group and the target llmspeed does not read (:data:`_TARGET_FORMS`)."""
    for key, group in (quant.get("config_groups") or {}).items():
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{directory}: config group {key!r} has targets {targets!r}; llmspeed reads a non-empty "
                             f"list of {_TARGET_FORMS}")  # fmt: skip
        for t in targets:
            try:
                why = None if t == "Linear" or t in linears or any(_matches(n, [t]) for n in linears) else "it matches"
            except re.error as err:
                why = f"it is no regular expression ({err}) and matches"
            if why:
                raise ValueError(f"{directory}: config group {key!r} has target {t!r}; {why} no linear layer of the "
                                 f"model; llmspeed reads {_TARGET_FORMS}")  # fmt: skip


def _group_of(name: str, groups: dict[str, Any]) -> str | None:
    """The key of the config group compressed-tensors applies to linear layer ``name``, or ``None``: as its
    ``apply_quantization_config`` ranks targets, an exact name first, then a ``re:`` pattern (each kind in sorted
    order), then the class ``"Linear"``; a target two groups list belongs to the later group."""
    by_target = {t: key for key, g in groups.items() for t in g.get("targets") or []}
    ranked = sorted((t for t in by_target if t != "Linear"), key=lambda t: ("re:" in t, t))
    for t in [*ranked, "Linear"]:
        if t in by_target and _matches(name, [t]):
            return by_target[t]
    return None


def group_config(key: str, group: dict[str, Any], source: Path) -> QuantConfig:
    """The llmspeed :class:`QuantConfig` of config group ``key``; ``ValueError`` naming what llmspeed cannot read."""
    if group.get("input_activations") is not None or group.get("output_activations") is not None:
        raise ValueError(
            f"{source}: config group {key!r} quantizes activations too; llmspeed loads weight-only schemes"
        )
    w = group.get("weights") or {}
    bits, strategy, sym = w.get("num_bits"), w.get("strategy"), w.get("symmetric", True)
    # actorder "weight" (its alias "static"): GPTQ visited columns in activation order, the groups stay contiguous
    if w.get("type", "int") != "int" or w.get("actorder") not in (None, "weight", "static"):
        raise ValueError(
            f"{source}: config group {key!r} has weights type={w.get('type')!r}, actorder={w.get('actorder')!r}; "
            f"llmspeed reads integer weights whose groups are contiguous (actorder None, 'weight' or 'static')"
        )
    if bits == 4 and strategy in ("group", "channel"):
        return QuantConfig("int4", w.get("group_size") if strategy == "group" else None, symmetric=bool(sym))
    if bits == 8 and strategy == "channel" and sym:
        return QuantConfig("int8", None)
    raise ValueError(
        f"{source}: config group {key!r} has num_bits={bits}, strategy={strategy!r}, symmetric={sym}; llmspeed "
        f"reads 4-bit group or channel and symmetric 8-bit channel schemes"
    )


def layer_config(name: str, quant: dict[str, Any], source: Path) -> QuantConfig:
    """The llmspeed :class:`QuantConfig` of quantized layer ``name`` under ``quantization_config`` ``quant``."""
    groups = quant.get("config_groups") or {}
    key = _group_of(name, groups)
    if key is None:
        raise ValueError(f"{source}: layer {name!r} has packed weights but no config group targets it")
    return group_config(key, groups[key], source)


def _expect(
    source: Path, key: str, t: torch.Tensor | None, dtypes: tuple[torch.dtype, ...], shape
) -> torch.Tensor:
    if t is None:
        raise ValueError(f"{source}: tensor {key!r} is missing")
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"{source}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}; "
            f"it must be {names} {list(shape)}"
        )
    return t


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def module_buffers(
    name: str, module: QuantizedLinearBase, tensors: dict[str, torch.Tensor], source: Path
) -> dict:
    """``{buffer name: tensor}`` of ``module`` from its compressed-tensors tensors (popped from ``tensors``)."""
    cfg, out, k = module.config, module.out_features, module.in_features
    get = tensors.pop
    shape = _expect(
        source, f"{name}.weight_shape", get(f"{name}.weight_shape", None), (torch.int64, torch.int32), (2,)
    )
    if shape.tolist() != [out, k]:
        raise ValueError(
            f"{source}: tensor {name + '.weight_shape'!r} is {shape.tolist()}; the layer is [{out}, {k}]"
        )
    if cfg.format == "int8":
        packed = _expect(source, f"{name}.weight_packed", get(f"{name}.weight_packed", None), (torch.int32,),
                         (out, -(-k // 4)))  # fmt: skip
        scale = _expect(source, f"{name}.weight_scale", get(f"{name}.weight_scale", None), _FLOATS, (out, 1))
        return {"qweight": unpack_int8(packed, k), "scales": scale.float().reshape(out)}
    groups = cfg.num_groups(k)
    packed = _expect(source, f"{name}.weight_packed", get(f"{name}.weight_packed", None), (torch.int32,),
                     (out, -(-k // 8)))  # fmt: skip
    scale = _expect(source, f"{name}.weight_scale", get(f"{name}.weight_scale", None), _FLOATS, (out, groups))
    if cfg.symmetric:
        zeros = torch.full((out, groups), P.SYMMETRIC_ZERO)  # [out, groups]
    else:
        zp = _expect(source, f"{name}.weight_zero_point", get(f"{name}.weight_zero_point", None), (torch.int32,),
                     (-(-out // 8), groups))  # fmt: skip
        zeros = unpack_int4(zp.T, out).T.float()  # [out, groups]
    kp = cfg.padded_in_features(k)
    if kp == k and k % 8 == 0:
        qweight = little_endian_bytes(packed)  # [out, in / 2]: already llmspeed's nibble order
    else:
        codes = unpack_int4(packed, k)  # [out, in]
        pad = zeros[:, -1:].to(torch.uint8).expand(out, kp - k)  # padding columns hold the code of 0.0
        qweight = P.pack_nibbles(torch.cat([codes, pad], dim=1))  # [out, in_pad / 2]
    return {"qweight": qweight, "scales": scale.to(P.SCALE_DTYPE), "zeros": zeros.to(P.SCALE_DTYPE)}  # fp16 (rounded)


def check_readable(directory: Path, quant: dict[str, Any]) -> None:
    """``ValueError`` naming what ``quant`` (``config.json``'s ``quantization_config``) holds that llmspeed cannot read:
    sparse weights (a ``sparsity_config`` in a format other than ``"dense"``), a quantized KV cache (a
    ``kv_cache_scheme``), experts pruned per layer (a ``moe_sparsity_config`` that counts experts), a config group in a format other
    than ``pack-quantized`` or with a scheme :func:`group_config` refuses, or ``config_groups`` that are not objects.
    Called before any tensor is read: those folders store other tensors. Transforms are checked by :func:`.ct_transforms.rotated_layers` in :func:`load`."""
    sparsity = quant.get("sparsity_config") or {}
    fmt = sparsity.get("format") if isinstance(sparsity, dict) else sparsity
    if sparsity and fmt != "dense":
        raise ValueError(
            f"{directory}: config.json's quantization_config has sparsity_config format {fmt!r} (sparse weights "
            f"stored as their nonzero values and a bitmask), which llmspeed does not support; it reads dense "
            f"compressed-tensors folders ({PACK_FORMAT!r} int4 and int8 weights, sparsity_config empty or "
            f"'dense'): load a dense float checkpoint and call llmspeed.quantize instead"
        )
    if quant.get("kv_cache_scheme") is not None:
        raise ValueError(
            f"{directory}: config.json's quantization_config has a kv_cache_scheme "
            f"({quant['kv_cache_scheme']!r}: keys and values quantized in the KV cache, with their scales stored "
            f"beside the attention layers), which llmspeed does not apply: it reads weight-only schemes and keeps "
            f"the KV cache in the model's dtype; export the checkpoint without kv_cache_scheme"
        )
    moe = quant.get("moe_sparsity_config") or {}
    experts = moe.get("num_experts") if isinstance(moe, dict) else moe
    if moe and (not isinstance(experts, list) or any(n is not None for n in experts)):
        raise ValueError(
            f"{directory}: config.json's quantization_config has a moe_sparsity_config (experts pruned or merged "
            f"per layer, method {moe.get('method') if isinstance(moe, dict) else moe!r}), which llmspeed does not "
            f"support: it reads dense models, whose moe_sparsity_config is absent or counts no experts"
        )
    groups = quant.get("config_groups") or {}
    if not isinstance(groups, dict) or not all(
        isinstance(g, dict) and isinstance(g.get("weights") or {}, dict) for g in groups.values()
    ):
        raise ValueError(
            f"{directory / 'config.json'} field quantization_config.config_groups must map group names to objects "
            f"(each with a 'weights' object); got {groups!r}"
        )
    for key, group in groups.items():
        if (fmt := group.get("format") or quant.get("format")) != PACK_FORMAT:
            raise ValueError(
                f"{directory}: config group {key!r} is in compressed-tensors format {fmt!r}; llmspeed reads "
                f"{PACK_FORMAT!r} (int4, int8 weights); load a float checkpoint and call llmspeed.quantize instead"
            )
        group_config(key, group, directory)  # a scheme llmspeed cannot read, named before the weights are read


def load(directory: Path, device: str | torch.device = "cpu") -> Model:
    """Read a compressed-tensors ``pack-quantized`` folder into llmspeed's packed modules (no float weights)."""
    config = read_config(directory)
    quant = config["quantization_config"]
    check_readable(directory, quant)
    dtype = config_dtype(config)
    source = directory
    model = skeleton.skeleton(directory, dtype)
    linears = set(model.linear_names())
    check_targets(source, quant, linears)
    rotated = ct_transforms.rotated_layers(source, quant, sorted(linears), _matches)
    tensors = read_all(directory)  # after the checks of the config: the folder is refused before it is read
    quantized = sorted(k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed"))
    if set(rotated) - set(quantized):
        raise ValueError(f"{source}: transform_config rotates layers stored in float, e.g. "
                         f"{sorted(set(rotated) - set(quantized))[0]!r}; llmspeed rotates quantized int4 layers only")  # fmt: skip
    for name in quantized:
        if name not in linears:
            raise ValueError(
                f"{source}: tensor {name + '.weight_packed'!r} names no linear layer of the model"
            )
        cfg = layer_config(name, quant, source)
        if name in rotated:
            cfg = ct_transforms.rotated_config(source, name, cfg, rotated[name], tensors)
        module = skeleton.install(model, name, cfg, bias=f"{name}.bias" in tensors)
        want = {f"{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()}
        for buf, t in module_buffers(name, cast(QuantizedLinearBase, module), tensors, source).items():
            skeleton.assign(model, f"{name}.{buf}", t.contiguous(), source, want)
    want = skeleton.expected(model)
    for name, tensor in skeleton.to_model_dtype(tensors, want).items():  # float tensors in the model's dtype
        skeleton.assign(model, name, tensor, source, want)
    skeleton.tie_embeddings(model)
    return skeleton.finish(model, dtype, device, source)
