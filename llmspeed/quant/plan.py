"""``plan_layers``: which linear layers ``quantize`` changes and each one's config, checked before any change."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import cast

from torch import nn

from ..names import format_name
from ..protocol import CausalLM, base_linear, is_fake_quantized, is_quantized
from .config import QuantConfig
from .hadamard import check_rotatable

DEFAULT_LM_HEAD = "int8"  # quantize's output head: per output channel (docs/quantization.md measures its cost)


def output_head_names(model: CausalLM) -> list[str]:
    """The names, among ``model.linear_names()``, of the model's output head: the linear that
    ``get_output_embeddings()`` returns, else any named ``lm_head`` (what ``quantize``'s ``lm_head=`` decides for)."""
    get = getattr(model.module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    names = [name for name, module in model.linear_layers() if head is not None and module is head]
    return names or [n for n in model.linear_names() if n.split(".")[-1] == "lm_head"]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def _check_patterns(model: CausalLM, arg: str, patterns: Sequence[str]) -> None:
    names = model.linear_names()
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{arg} must hold qualified-name strings or patterns; got {p!r}")
        if any(fnmatch.fnmatchcase(n, p) for n in names):
            continue
        try:
            found = model.module.get_submodule(p)
        except AttributeError:
            found = None
        if found is not None:
            raise ValueError(
                f"{arg} names {p!r}, which is a {type(found).__name__}, not a linear layer; "
                f"only linear positions can be quantized (e.g. {names[0]!r})"
            )
        hint = f" (as a suffix: {'*.' + p!r})" if any(n.endswith("." + p) for n in names) else ""
        raise ValueError(
            f"{arg} pattern {p!r} matches no linear layer{hint}; linear positions look like {names[:3]}"
        )


def plan_layers(
    model: CausalLM,
    config: QuantConfig,
    skip: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    int8_layers: Sequence[str] | None = None,
    lm_head: str | None = DEFAULT_LM_HEAD,
    hadamard_layers: Sequence[str] | None = None,
) -> dict[str, QuantConfig]:
    """Which linear positions ``quantize`` would change, each with its config; raises before anything changes.

    Layers matching ``int8_layers`` get :func:`int8_config` of ``config`` instead of ``config``; the output
    head gets the format ``lm_head`` names (``"int8"``, ``config.format``, or ``None``: left in float) unless
    ``skip`` or ``include`` leave it out; int4 layers matching ``hadamard_layers`` get ``hadamard=True``.
    """
    if any(isinstance(p, str) for p in (skip, include, int8_layers, hadamard_layers)):
        raise ValueError(
            "skip, include, int8_layers and hadamard_layers must be lists of names or patterns, not a single string"
        )
    for arg, value in (("skip", skip), ("include", include), ("int8_layers", int8_layers), ("hadamard_layers", hadamard_layers)):
        if value is not None and not isinstance(value, Iterable):
            raise ValueError(f"{arg} must be None or a list of names or patterns; got {value!r}")
    lm_head = format_name(lm_head)  # "INT8" is "int8", as the format itself is spelled in any case
    if lm_head not in (None, "int8", config.format):
        raise ValueError(
            f"lm_head must be None (float), 'int8' or the model's format {config.format!r}; got {lm_head!r}"
        )
    heads = output_head_names(model)
    if skip is None:
        skip = []
    else:
        _check_patterns(model, "skip", skip)
    if lm_head is None:
        skip = [*skip, *heads]
    if include is not None:
        _check_patterns(model, "include", include)
    if int8_layers:
        if config.format == "int8":
            raise ValueError("int8_layers keeps some layers of a 4-bit model at int8; the format is int8 already")
        _check_patterns(model, "int8_layers", int8_layers)
    already = {name for name, m in model.linear_layers() if is_quantized(m)}
    plan, again = {}, []
    for name, module in model.linear_layers():
        if _matches(name, skip) or (include is not None and not _matches(name, include)):
            continue
        if name in already:
            again.append(name)
            continue
        if is_fake_quantized(module):
            raise ValueError(
                f"layer {name!r} is prepared for quantization-aware training; use llmspeed.qat.convert(model)"
            )
        if base_linear(module) is not module:
            raise ValueError(
                f"layer {name!r} is wrapped ({type(module).__name__}); quantize (or qat.prepare) the float "
                f"model before adding adapters"
            )
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, not an nn.Linear; add it to skip")
        if module.in_features == 0:  # every method's scales reduce over the input features
            raise ValueError(
                f"layer {name!r} has in_features=0 ({module.in_features} -> {module.out_features}): it has no "
                f"weights to quantize (its output is its bias alone); add it to skip to leave it in float"
            )
        g = config.group_size
        if g is not None and g > module.in_features:
            raise ValueError(
                f"group_size={g} is larger than in_features={module.in_features} of {name!r}; "
                f"use group_size <= {module.in_features} or None"
            )
        int8 = (int8_layers and _matches(name, int8_layers)) or (name in heads and lm_head == "int8")
        int8 = int8 and config.format != "int8"  # an int8 model's head is its own format: its group size too
        plan[name] = int8_config(config) if int8 else config
    if again:  # a loaded GGUF or GPTQ model may keep some layers in float: those alone can be quantized
        floats = [n for n, m in model.linear_layers() if n not in already and isinstance(m, nn.Linear)]
        rest = f", or quantize only layers still in float with include=[...] (e.g. {floats[:3]})" if floats else ""
        raise ValueError(
            f"model is already quantized ({len(already)} layers, e.g. {again[0]!r}); quantizing a layer twice would "
            f"compound the error: load or build the float model again and quantize it once{rest}"
        )
    if include is None:
        _refuse_unreached_projections(model, plan)
    if not plan:
        raise ValueError("skip/include leave no linear layer to quantize")
    if hadamard_layers:
        _check_patterns(model, "hadamard_layers", hadamard_layers)
    for arg, patterns in (("int8_layers", int8_layers), ("hadamard_layers", hadamard_layers)):
        for p in patterns or ():  # a pattern reaching only float layers would silently change nothing
            if not any(_matches(name, [p]) for name in plan):
                raise ValueError(f"{arg} pattern {p!r} matches only layers left in float (by skip, include or an "
                                 f"output head kept in float); quantized layers look like {list(plan)[:3]}")  # fmt: skip
    if hadamard_layers:
        plan = _with_hadamard(model, plan, hadamard_layers)
    return plan


def _refuse_unreached_projections(model: CausalLM, plan: dict[str, QuantConfig]) -> None:
    """``ValueError`` when the model keeps projections in transformers' ``Conv1D`` layers (GPT-2's ``c_attn``,
    ``c_fc``, ...): a linear with its weight transposed, not an ``nn.Linear`` position, so quantizing the model
    would silently change only its ``nn.Linear`` layers (GPT-2: the output head) and leave the rest in float."""
    conv = [name for name, module in model.module.named_modules() if type(module).__name__ == "Conv1D"]
    if conv:
        changed = f"only {list(plan)[:3]}" if plan else "nothing"
        raise ValueError(
            f"{type(model.module).__name__} keeps {len(conv)} projections in transformers Conv1D layers (e.g. "
            f"{conv[0]!r}), which llmspeed does not quantize (it quantizes nn.Linear layers); quantizing it would "
            f"change {changed} and leave those in float. Pass include=[...] to quantize only "
            f"nn.Linear layers knowingly"
        )


def check_materialized(model: CausalLM, plan: dict[str, QuantConfig]) -> None:
    """``ValueError`` when a planned layer's weight is on the ``meta`` device: it holds no values to quantize."""
    layers = dict(model.linear_layers())
    meta = [name for name in plan if layers[name].weight.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{len(meta)} planned layers (e.g. {meta[0]!r}) have their weights on the meta device, which holds no "
            f"values to quantize; load the weights first (llmspeed.models.from_pretrained(path, quantize=...) "
            f"quantizes a checkpoint as it reads it)"
        )


def _with_hadamard(model: CausalLM, plan: dict[str, QuantConfig], patterns: Sequence[str]) -> dict[str, QuantConfig]:
    """``plan`` with ``hadamard=True`` on the planned layers matching ``patterns`` (int4 ones only)."""
    layers = dict(model.linear_layers())
    out = dict(plan)
    for name, cfg in plan.items():
        if not _matches(name, patterns):
            continue
        if cfg.format != "int4":
            raise ValueError(
                f"hadamard_layers rotates int4 layers; layer {name!r} would be {cfg.format} (the format, "
                f"int8_layers or lm_head): leave it out of hadamard_layers"
            )
        check_rotatable(name, cast(int, layers[name].in_features), cfg.group_size)  # an nn.Linear's int
        out[name] = replace(cfg, hadamard=True)
    return out


def int8_config(config: QuantConfig) -> QuantConfig:
    """``config`` for a layer kept at int8 in a 4-bit model: per output channel, same method and kernel."""
    return replace(config, format="int8", group_size=None, double_quant=False, symmetric=None)
