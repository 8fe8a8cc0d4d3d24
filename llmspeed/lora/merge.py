"""Fold an adapter into its base weights (``merge``) and take it out again (``unmerge``).

On a float base the update ``W += scale * B @ A`` is exact up to float rounding, and unmerge
subtracts it again; a float weight another module shares (an output head tied to the input embedding)
is left alone: the layer gets a merged float copy, and unmerge puts the tied one back. On a quantized base there is no float weight to add to: merge dequantizes,
adds, and re-quantizes with ``type(base).from_linear(linear, base.config)``; that rounding
changes the weight, so merge warns and reports the error it introduced next to the size of the
update it was meant to add (when the error is comparable to the update, the merged model has
lost much of what the adapter learned: keep it unmerged, or merge with ``requantize=False`` into a
float copy of the layer). The quantized module that was replaced is kept, so unmerge restores it
bit for bit.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..precision import cpu_matmul
from ..protocol import CausalLM, holds_step_lock, is_fake_quantized, is_quantized
from ..quant.methods import METHODS
from .inject import adapter_names, lora_layers, registry, require_adapter, wrapped
from .layer import LoraLinear


@dataclass(frozen=True)
class MergeReport:
    """What a merge did.

    Attributes:
        adapter: The adapter merged.
        layers: Number of layers changed.
        requantized: Layers whose quantized base was re-quantized (error below applies to them).
        max_abs_error: Largest ``|W_merged - (W + delta)|`` over all re-quantized weights (0 on float).
        error_vs_update: Worst layer's ``||W_merged - (W + delta)|| / ||delta||`` (0 on float); near
            or above 1 means the rounding is as large as the adapter's whole update.
    """

    adapter: str
    layers: int
    requantized: int
    max_abs_error: float
    error_vs_update: float


def _cast_matmul(model: CausalLM) -> bool:
    """Whether a cast installed the per-call 16-bit matmul (:mod:`llmspeed.precision.cpu_matmul`) on the model."""
    root = model.module
    return bool(cpu_matmul.installed(root) or cpu_matmul.embedding_installed(root))


def _like_the_model(layer: nn.Module, cast_matmul: bool) -> nn.Module:
    """``layer`` (a float ``nn.Linear`` a merge made or an unmerge restores) given the cast's per-call 16-bit matmul
    where the model's other linears have it (``cast_matmul``, :func:`_cast_matmul`): on a CPU whose cast model hands
    out fp32 activations, a 16-bit layer without it would be called with fp32 inputs and fail."""
    if cast_matmul and type(layer) is nn.Linear:
        cpu_matmul.install(layer)
    return layer


def _float_weight(base: nn.Module) -> torch.Tensor:
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(
            f"cannot merge into {type(base).__name__}: it has neither a float weight nor dequantize()"
        )
    return weight


def _check_requantizable(adapter: str, layer_name: str, base: Any) -> None:
    """Raise (before any layer changes) unless ``base`` can quantize a merged weight on its own.

    Its method must quantize one weight at a time (RTN, HQQ): GPTQ and AWQ quantize whole models from calibration
    text. Rounding the merged weight onto their grid instead was measured to drop most of an adapter's update
    (every weight sits on a grid point, and an update under half a step rounds back to it).
    """
    from_linear = getattr(type(base), "from_linear", None)
    if from_linear is None:
        raise TypeError(f"{type(base).__name__} ({layer_name}) has no from_linear(); merge with requantize=False")
    method = getattr(getattr(base, "config", None), "method", None)
    if method is not None and (method not in METHODS or METHODS[method].weight is None):
        raise ValueError(
            f"cannot merge adapter {adapter!r} with requantize=True: layer {layer_name!r} was quantized with "
            f"method={method!r}, which quantizes whole models from calibration text, not one merged weight; merge "
            f"with requantize=False (the merged layers become float), keep the adapter unmerged, or merge it into "
            f"the float model and quantize that"
        )


def _merge_quantized(layer: LoraLinear, name: str, requantize: bool, dtype: torch.dtype) -> tuple[float, float]:
    """Merge into a quantized base: re-quantized in its format, or (``requantize=False``) a float ``nn.Linear`` in
    the model's ``dtype`` (the quantized layer computed in its input's dtype; a float layer must hold that dtype)."""
    base: Any = layer.base_layer
    weight = cast(torch.Tensor, base.dequantize())  # [out, in]
    delta = layer.delta_weight(name).detach().to(weight.dtype)  # [out, in]
    target = weight + delta  # [out, in]
    bias = getattr(base, "bias", None)
    linear = nn.Linear(
        layer.in_features, layer.out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(target)
        if bias is not None:
            linear.bias.copy_(bias)
    if requantize:
        new_base = type(base).from_linear(linear, base.config)  # _check_requantizable ran before any change
        if bias is not None:  # the base's own bias, not the fp32 copy of the dequantized linear's: a cast model's bf16
            new_base.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        err = new_base.dequantize().to(target.dtype) - target  # [out, in]
        errors = (err.abs().max().item(), (err.norm() / delta.norm().clamp_min(1e-30)).item())
    else:
        new_base = linear.to(dtype).requires_grad_(False)
        errors = (0.0, 0.0)
    layer.premerge[name] = base
    layer.base_layer = new_base
    return errors


def _merge_into_copy(layer: LoraLinear, name: str, weight: torch.Tensor) -> None:
    """Merge into a float ``nn.Linear`` copy of the base, kept aside for unmerge: the base's own weight is shared
    with another module (an output head tied to the input embedding), which an in-place add would change too."""
    base = layer.base_layer
    bias = getattr(base, "bias", None)
    linear = nn.Linear(
        layer.in_features, layer.out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    ).requires_grad_(False)
    linear.weight.copy_(weight + layer.delta_weight(name).to(weight.dtype))
    if bias is not None:
        linear.bias.copy_(bias)
    layer.premerge[name] = base
    layer.base_layer = linear


@holds_step_lock
@torch.no_grad()
def merge(model: CausalLM, name: str, requantize: bool = True) -> MergeReport:
    """Fold adapter ``name`` into the base weights of every layer it covers.

    Args:
        model: The model carrying the adapter.
        name: The adapter to merge.
        requantize: On quantized layers, re-quantize the merged weight into the same format (the
            default; warns with the error; layers of a per-weight method only) or replace the layer by a
            float ``nn.Linear``.

    Returns:
        A :class:`MergeReport`. While merged, forward skips the adapter's delta.

    Raises:
        ValueError: the adapter does not exist or is already merged, the call is inside :func:`~llmspeed.lora.disabled`,
            ``requantize`` is not a bool, its
            layers are prepared for quantization-aware training (convert first), or ``requantize=True`` meets
            a layer GPTQ or AWQ quantized (they cannot quantize one merged weight); model unchanged.
    """
    model = wrapped(model)  # the transformers model add_adapter took, too
    require_adapter(model, name)
    if not isinstance(requantize, bool):
        raise ValueError(f"requantize must be a bool; got {requantize!r}")
    named = [(n, layer) for n, layer in lora_layers(model) if name in layer.lora_A]
    layers = [layer for _, layer in named]
    if any(name in layer.merged for layer in layers):
        raise ValueError(f"adapter {name!r} is already merged; unmerge it first")
    if any(layer.disabled for layer in layers):  # the merged weights would run inside the "base alone" block
        raise ValueError(
            f"cannot merge adapter {name!r} inside lora.disabled(model): the block runs the base alone, and merged "
            f"weights cannot be disabled; merge after the block"
        )
    prepared = [n for n, layer in named if is_fake_quantized(layer.base_layer)]
    if prepared:  # adding to the latent weight would change the fake-quantized output, reported as exact
        raise ValueError(
            f"adapter {name!r} wraps {len(prepared)} layers prepared for quantization-aware training "
            f"(e.g. {prepared[0]!r}); call llmspeed.qat.convert(model) first, then merge"
        )
    for layer_name, layer in named:  # check every layer can be merged before changing any
        if not is_quantized(layer.base_layer):
            _float_weight(layer.base_layer)
        elif requantize:
            _check_requantizable(name, layer_name, layer.base_layer)
    counts = Counter(id(p) for _, p in model.module.named_parameters(remove_duplicate=False))
    cast_matmul = _cast_matmul(model)  # read once: the walk over every module is the same for each layer
    max_abs, worst, requantized = 0.0, 0.0, 0
    for layer in layers:
        if is_quantized(layer.base_layer):
            abs_err, rel_err = _merge_quantized(layer, name, requantize, model.spec.dtype)
            max_abs, worst = max(max_abs, abs_err), max(worst, rel_err)
            requantized += int(requantize)
        else:
            weight = _float_weight(layer.base_layer)
            if counts[id(weight)] > 1:  # tied: an in-place add would change the input embedding too
                _merge_into_copy(layer, name, weight)
            else:
                weight.add_(layer.delta_weight(name).to(weight.dtype))
        _like_the_model(layer.base_layer, cast_matmul)
        layer.merged = (*layer.merged, name)
    report = MergeReport(name, len(layers), requantized, max_abs, worst)
    if requantized:
        warnings.warn(
            f"merging adapter {name!r} re-quantized {requantized} layers: max abs weight error {max_abs:.3g}, "
            f"worst error/update norm ratio {worst:.3g}; unmerge restores the original bit for bit, or merge "
            f"with requantize=False to keep the merged layers in float",
            stacklevel=2,
        )
    return report


@holds_step_lock
@torch.no_grad()
def unmerge(model: CausalLM, name: str) -> None:
    """Take adapter ``name`` out of the base weights again (quantized layers: bit-exact restore).

    Raises:
        ValueError: the adapter does not exist, is not merged, or another adapter was merged into
            the same quantized layers after it (unmerge that one first); model unchanged.
    """
    model = wrapped(model)
    require_adapter(model, name)
    layers = [layer for _, layer in lora_layers(model) if name in layer.merged]
    if not layers:
        raise ValueError(f"adapter {name!r} is not merged; nothing to unmerge")
    for layer in layers:
        if name in layer.premerge and layer.merged[-1] != name:
            raise ValueError(
                f"adapter {layer.merged[-1]!r} was merged into the same re-quantized layers after {name!r}; "
                f"unmerge {layer.merged[-1]!r} first"
            )
    cast_matmul = _cast_matmul(model)
    for layer in layers:
        if name in layer.premerge:
            layer.base_layer = _like_the_model(layer.premerge.pop(name), cast_matmul)
        else:
            weight = _float_weight(layer.base_layer)
            weight.sub_(layer.delta_weight(name).to(weight.dtype))
        layer.merged = tuple(n for n in layer.merged if n != name)


@holds_step_lock
@torch.no_grad()
def merge_and_unload(model: CausalLM, name: str | None = None, requantize: bool = True) -> MergeReport | None:
    """Merge adapter ``name`` (if given) and take every LoRA wrapper off the model, leaving a plain model that
    :func:`llmspeed.save`, the compressed-tensors export and every kernel take as they take one never adapted
    (PEFT's ``merge_and_unload``).

    Each wrapped position gets its base layer back, holding the adapters merged into it: an updated float weight,
    the re-quantized module, or the float layer of ``requantize=False``. Adapters merged earlier stay merged; the
    quantized modules kept for :func:`unmerge` are dropped, so nothing can be unmerged afterwards.

    Args:
        model: The model carrying the adapters.
        name: An adapter to merge first (as :func:`merge`), or ``None`` when the adapters to keep are merged
            already.
        requantize: Passed to :func:`merge` with ``name``.

    Returns:
        The :class:`MergeReport` of merging ``name``, or ``None`` without one.

    Raises:
        ValueError: ``name`` is not an adapter, or is merged already (as :func:`merge`); or an adapter on the
            model would be dropped without being merged (delete it with :func:`delete_adapter`, or merge it); or
            an adapter is (to be) merged into a quantized output head that also serves as the input embedding.
            The model is unchanged.
    """
    model = wrapped(model)
    if name is not None:
        require_adapter(model, name)
    layers = dict(lora_layers(model))
    merged = {n for layer in layers.values() for n in layer.merged}
    unmerged = [n for n in adapter_names(model) if n not in merged and n != name]
    if unmerged:
        raise ValueError(
            f"adapters {unmerged} are neither merged nor named: merge_and_unload would drop them; delete them "
            f"first (lora.delete_adapter) or merge them (lora.merge)"
        )
    heads = [m.head for m in model.module.modules() if type(m).__name__ == "QuantizedEmbedding"]
    for position, layer in layers.items():  # the input embedding reads this head's quantized rows
        changed = layer.merged or (name is not None and name in layer.lora_A)
        if changed and any(h is layer.base_layer or h in layer.premerge.values() for h in heads):
            raise ValueError(
                f"the output head {position!r} is also the model's input embedding (quantize's share_embedding): "
                f"merging an adapter into it and unloading would untie the two, which llmspeed.save cannot write; "
                f"use lora.merge without unloading, or quantize with share_embedding=False"
            )
    report = merge(model, name, requantize) if name is not None else None
    for position, layer in layers.items():
        layer.premerge.clear()
        model.replace_linear(position, layer.base_layer)
    registry(model).clear()
    return report
