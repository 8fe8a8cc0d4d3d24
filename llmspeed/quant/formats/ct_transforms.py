"""compressed-tensors ``transform_config`` for layers quantized with ``QuantConfig.hadamard``, both ways.

Such a layer stores ``W H`` (``H``: the group's Sylvester Hadamard matrix over ``sqrt(g)``, per group of ``g``
input columns) and rotates its input the same way (:mod:`llmspeed.quant.hadamard`). In compressed-tensors'
terms that is a transform group of ``type: "hadamard"`` (Sylvester's matrix, ``randomize: false``) with
``head_dim: g``, applied online at the layer's ``"input"`` and fused into its weight at ``"weight_input"``
with ``inverse: true``: the shape llm-compressor writes for SpinQuant's R4 rotation of the down projections.
A reader applies the online part only (the weights are stored already rotated), as vLLM does. Each rotated
layer also carries the matrix compressed-tensors registers on the module, ``{layer}.{group}_input.weight``
(``[g, g]``, entries +-1: compressed-tensors divides by ``sqrt(g)`` when it applies it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import QuantConfig
from ..hadamard import hadamard

GROUP = "R4"  # the transform group's name (SpinQuant's name for the down projections' rotation)


def _group_name(size: int, sizes: set[int]) -> str:
    return GROUP if len(sizes) == 1 else f"{GROUP}_{size}"


def describe(rotated: dict[str, int]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(transform_config, tensors)`` for ``rotated`` (layer name -> group size); ``({}, {})`` when empty."""
    sizes = set(rotated.values())
    groups: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for size in sorted(sizes):
        names = sorted(n for n, g in rotated.items() if g == size)
        group = _group_name(size, sizes)
        groups[group] = {
            "type": "hadamard",
            "apply": [
                {"targets": names, "location": "input", "inverse": False, "ignore": []},
                {"targets": names, "location": "weight_input", "inverse": True, "ignore": []},
            ],
            "randomize": False,
            "requires_grad": False,
            "head_dim": size,
            "precision": "torch.float32",
        }
        matrix = (hadamard(size, torch.float64) * size**0.5).round().float()  # [g, g] +-1
        tensors.update({f"{n}.{group}_input.weight": matrix.clone() for n in names})  # safetensors stores no aliases
    return ({"config_groups": groups} if groups else {}), tensors


def _refuse(directory: Path, what: str) -> ValueError:
    return ValueError(
        f"{directory}: config.json's quantization_config has a transform_config llmspeed cannot apply ({what}); "
        f"it reads Hadamard transforms (type 'hadamard', not randomized) whose head_dim is the layer's group "
        f"size, applied at a linear layer's 'input' and fused at its 'weight_input' (inverse): the layers "
        f"llmspeed.quantize(..., hadamard_layers=...) writes. Load a float checkpoint and call llmspeed.quantize"
    )


def rotated_layers(directory: Path, quant: dict[str, Any], linears: list[str], matches) -> dict[str, tuple[str, int]]:
    """``{layer name: (transform group, head_dim)}`` of the layers ``quant``'s ``transform_config`` rotates.

    ``matches(name, targets)``: the format's target matching. ``ValueError`` (before any tensor is read) for
    any transform llmspeed cannot apply: another type, randomized, without ``head_dim``, another location, an
    ``input`` transform without its fused ``weight_input`` inverse on the same layers, or targets naming no layer.
    """
    transforms = quant.get("transform_config") or {}
    steps = transforms.get("config_groups") if isinstance(transforms, dict) else transforms
    if not steps:
        return {}
    if not isinstance(steps, dict):
        raise _refuse(directory, f"config_groups {steps!r}")
    out: dict[str, tuple[str, int]] = {}
    for key, group in steps.items():
        if not isinstance(group, dict) or group.get("type") != "hadamard" or group.get("randomize"):
            kind = group.get("type") if isinstance(group, dict) else group
            raise _refuse(directory, f"group {key!r} is {kind!r}{' randomized' if isinstance(group, dict) and group.get('randomize') else ''}")
        size = group.get("head_dim")
        if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size & (size - 1):
            raise _refuse(directory, f"group {key!r} has head_dim={size!r}; a power of two is needed")
        found: dict[tuple[str, bool], set[str]] = {}
        for arg in group.get("apply") or []:
            where = (arg.get("location"), bool(arg.get("inverse", False))) if isinstance(arg, dict) else (None, False)
            if where not in (("input", False), ("weight_input", True)):
                raise _refuse(directory, f"group {key!r} applies at {where[0]!r} with inverse={where[1]}")
            ignore = list(arg.get("ignore") or [])
            names = {n for n in linears if matches(n, list(arg.get("targets") or [])) and not matches(n, ignore)}
            found.setdefault(where, set()).update(names)
        online = found.get(("input", False), set())
        if not online or online != found.get(("weight_input", True)):
            raise _refuse(directory, f"group {key!r} rotates inputs of {sorted(online)[:3]} but fuses the inverse "
                                     f"into the weights of {sorted(found.get(('weight_input', True), set()))[:3]}")  # fmt: skip
        for name in online:
            if name in out:
                raise _refuse(directory, f"layer {name!r} is rotated by two groups")
            out[name] = (key, size)
    return out


def rotated_config(
    directory: Path, name: str, config: QuantConfig, transform: tuple[str, int], tensors: dict[str, torch.Tensor]
) -> QuantConfig:
    """``config`` with ``hadamard=True`` for layer ``name`` rotated by ``transform`` (group, head_dim); pops and checks
    the layer's stored matrix from ``tensors``. ``ValueError`` unless the layer is int4 with the rotation's group size."""
    group, size = transform
    if config.format != "int4" or config.group_size != size:
        raise ValueError(
            f"{directory}: layer {name!r} is rotated in blocks of {size} but quantized as {config.format} with "
            f"group_size={config.group_size}; llmspeed rotates int4 layers within their own groups"
        )
    key = f"{name}.{group}_input.weight"
    if key in tensors:
        _check_matrix(directory, key, tensors.pop(key), size)
    return replace(config, hadamard=True)


def _check_matrix(directory: Path, key: str, tensor: torch.Tensor, size: int) -> None:
    """``ValueError`` unless ``tensor`` (a rotated layer's stored transform) is the Sylvester Hadamard matrix of ``size``,
    unscaled or over ``sqrt(size)``."""
    want = hadamard(size, torch.float64)
    got = tensor.double()
    if tuple(got.shape) != (size, size) or not (
        torch.allclose(got, want, atol=1e-3) or torch.allclose(got, want * size**0.5, atol=1e-3)
    ):
        raise ValueError(
            f"{directory}: tensor {key!r} of shape {list(tensor.shape)} is not the {size}x{size} Sylvester Hadamard "
            f"matrix its transform group names; llmspeed applies that matrix"
        )
