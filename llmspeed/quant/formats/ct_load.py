"""compressed-tensors ``pack-quantized`` folders read into llmspeed's packed modules (:func:`load`); the layout
and the export are in :mod:`.compressed_tensors`.

Reading (:func:`load`) takes ``pack-quantized`` config groups with dense weights; other formats, other schemes
(:func:`group_config`), targets other than those :func:`check_targets` reads, and sparse folders (a
``sparsity_config`` other than ``"dense"``), are refused by name before any tensor is read;
Hadamard transforms of int4 layers within their groups load as ``hadamard`` layers, and any other transform
is refused before a layer is built. An int8 output head the export wrote as its float rows is rebuilt from the
record in the file's metadata (:mod:`.ct_head`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import torch

from ...model import Model
from .. import primitives as P
from ..config import QuantConfig
from ..modules import QuantizedLinearBase
from . import ct_head, ct_transforms, skeleton
from .files import config_dtype, read_all, read_config, read_metadata, shard_files
from .packing import little_endian_bytes, unpack_int4, unpack_int8

PACK_FORMAT = "pack-quantized"


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
    g = w.get("group_size")
    if bits == 8 and strategy == "group" and sym and isinstance(g, int) and g > 0 and g % 16 == 0:
        return QuantConfig("int8", g)
    raise ValueError(
        f"{source}: config group {key!r} has num_bits={bits}, strategy={strategy!r}, symmetric={sym}, group_size={g}; "
        f"llmspeed reads 4-bit group or channel and symmetric 8-bit channel or group (a multiple of 16) schemes"
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
        grouped = cfg.group_size is not None  # fp16 scales [out, groups], as the module holds them; else fp32 [out]
        scale = _expect(source, f"{name}.weight_scale", get(f"{name}.weight_scale", None), _FLOATS,
                        (out, cfg.num_groups(k) if grouped else 1))  # fmt: skip
        return {"qweight": unpack_int8(packed, k), "scales": scale.to(P.SCALE_DTYPE) if grouped else scale.float().reshape(out)}
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
    first = shard_files(directory)[0]  # the file whose metadata the export writes
    ct_head.restore(model, tensors, read_metadata(first), first)
    return skeleton.finish_foreign(model, tensors, dtype, device, source)
