"""``quantize``: swap a model's linear layers for quantized ones, in place, all or nothing (the layers and
their configs come from :func:`~llmspeed.quant.plan.plan_layers`)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from ..model import as_model
from ..names import format_name
from ..protocol import CausalLM, holds_step_lock
from .config import DEFAULT_GROUP_SIZE, QuantConfig, refuse_default_marker
from .embedding import share_tied_embedding, tied_head, unshareable
from .hadamard import rotate, rotated_inputs, rotation_group
from .kernels import check_kernel, check_kernel_name, get_kernel
from .methods import METHODS, get_method
from .methods.registry import rotating_methods, symmetric_methods
from .methods.rtn import rtn_weight
from .modules import QuantizedLinearBase, module_class
from .plan import DEFAULT_LM_HEAD, check_materialized, int8_config, output_head_names, plan_layers

_DEFAULT = object()
SENSITIVE = ("*.mlp.down_proj",)  # int8_layers for a 4-bit model that holds up off its calibration text


def _check_named_kernel(module: QuantizedLinearBase, weight) -> None:
    """A kernel named explicitly must handle this layer's shape (group size, padding) with the model's dtype."""
    if module.config.kernel == "auto":
        return
    x = torch.empty(1, module.in_features, dtype=weight.dtype, device=weight.device)
    reason = get_kernel(module.config.kernel).why_not(module, x)
    if reason is not None:
        raise ValueError(
            f"kernel={module.config.kernel!r} cannot run this model: {reason}; use kernel='auto'"
        )


@holds_step_lock
def quantize(
    model: CausalLM,
    fmt: str,
    group_size: int | None | Any = _DEFAULT,
    skip: Sequence[str] | None = None,
    method: str = "rtn",
    kernel: str = "auto",
    double_quant: bool = False,
    calibration: Any = None,
    include: Sequence[str] | None = None,
    method_options: dict[str, Any] | None = None,
    symmetric: bool | None = None,
    int8_layers: Sequence[str] | None = None,
    activations: str = "float",
    share_embedding: bool | None = None,
    lm_head: str | None = DEFAULT_LM_HEAD,
    hadamard_layers: Sequence[str] | None = None,
) -> CausalLM:
    """Quantize ``model``'s linear layers in place and return the model.

    Args:
        model: Any :class:`~llmspeed.protocol.CausalLM` (only ``linear_layers``/``replace_linear`` are used).
        fmt: ``"int8"`` (per output channel, or per group with ``group_size``), ``"int4"`` (group-wise, asymmetric unless ``symmetric``) or ``"nf4"``.
        group_size: Input channels per scale; default 64 for int4/nf4, per channel (``None``) for int8, which
            also takes a multiple of 16 (32: GGUF's ``Q8_0``; fp16 group scales, round to nearest).
        skip: Qualified names or ``fnmatch`` patterns left in float (default: none; the output head follows
            ``lm_head`` unless listed here). Embeddings are never linear positions.
        method: ``"rtn"``, ``"hqq"`` or a calibrated method (``"gptq"``, ``"awq"``, ``"awq+gptq"``; the
            registry, :data:`llmspeed.quant.METHODS`, lists them; docs/calibration.md compares them).
        kernel: ``"auto"`` or a kernel name from :func:`llmspeed.kernels` available on the model's device.
        double_quant: NF4 only: 8-bit quantization of the scales.
        calibration: Data for calibrated (model-level) methods, passed through to them unchanged; a
            per-weight method (``"rtn"``, ``"hqq"``) given calibration raises ``ValueError``.
        include: Only quantize layers matching these names/patterns (default: all).
        method_options: Extra keyword arguments for the method; a key it does not take is a ``ValueError``.
        symmetric: int4 only: zero points fixed at 8 and scales ``max(-min / 8, max / 7)`` per group (GPTQ: ``absmax / 7.5``; methods registered with
            ``symmetric=True``: rtn, gptq, awq, awq+gptq): the signed 4-bit grid vLLM's fastest kernels
            take. Default: asymmetric.
        int8_layers: int4 / nf4 only: qualified names or ``fnmatch`` patterns of layers quantized to int8
            (per output channel, same method) instead, as llama.cpp's ``Q4_K_M`` keeps some tensors at
            more bits. :data:`SENSITIVE` names the layers docs/calibration.md measured as costing the most
            at 4 bits. They cost more bytes (``llmspeed.memory_footprint(model)["linear"]``).
        activations: ``"float"`` (default) or ``"int8"``: dynamic int8 activations in blocks of 32 input
            channels (:class:`~llmspeed.quant.QuantConfig`), which the fused CPU decode step multiplies as
            integers against int4 and int8 codes (AVX-512 VNNI or AVX2); docs/quantization.md gives the accuracy cost.
        share_embedding: When the output head is quantized and tied to the input embedding
            (SmolLM2, Gemma, small Qwen2), the embedding becomes a lookup into the head's packed rows
            (:class:`~llmspeed.quant.embedding.QuantizedEmbedding`) and the float matrix is freed.
            ``None`` (default): do so whenever the head is quantized and tied (an NF4 head with
            ``double_quant``, whose rows cannot be read one by one, keeps the float embedding); ``False``: keep the float
            embedding; ``True``: require it (``ValueError`` when the head is not quantized or not tied).
        lm_head: The output head's format: ``"int8"`` (default: per output channel, round to nearest, as
            llama.cpp keeps its output tensor at 6 to 8 bits; docs/quantization.md measures it within 0.5%
            perplexity of the float head; an int8 model's head takes its ``group_size`` too), the model's own
            format (``"int4"`` for an int4 model), or ``None``
            to leave it in float (what transformers' bitsandbytes and AutoGPTQ do).
        hadamard_layers: int4 only: names or ``fnmatch`` patterns of layers quantized in a rotated basis: each
            group of input columns is multiplied by the group's Hadamard matrix before quantizing, and the
            layer rotates its input the same way before every matmul (``QuantConfig.hadamard``,
            :mod:`llmspeed.quant.hadamard`; QuaRot's online rotation of the down projections' input, kept
            inside each scale group). :data:`SENSITIVE` is where docs/calibration.md measured it to pay, on
            text unlike the calibration's. Per-weight methods and ``"gptq"`` take it; the fused CPU decode
            step rotates the down projections' input in place (other rotated layers take the generic path);
            the compressed-tensors export describes them as Hadamard transforms (``transform_config``).

    Raises:
        ValueError: on a bad argument, a layer that is quantized already (the layers a loaded GGUF or GPTQ model keeps
            in float can be quantized on their own with ``include``), a non-linear layer named explicitly, weights
            on the ``meta`` device or a kernel missing on this device: before any layer changes. If quantizing fails midway, every layer
            is restored.
    """
    model, fmt = as_model(model), format_name(fmt)  # a transformers model is wrapped; "INT4" is "int4"
    method = format_name(method)  # "GPTQ" is "gptq", as the format is spelled in any case
    refuse_default_marker(group_size)
    if group_size is _DEFAULT:  # a format that is no string (a list, say) is refused by QuantConfig, by name
        group_size = DEFAULT_GROUP_SIZE.get(fmt) if isinstance(fmt, str) else None
    config = QuantConfig(fmt, group_size, double_quant, method, kernel, symmetric, activations=format_name(activations))
    check_kernel_name(kernel, fmt)
    entry = get_method(method)
    if fmt == "int4" and config.symmetric and not entry.symmetric:
        raise ValueError(
            f"symmetric=True is available with method in {symmetric_methods()}; got method={method!r}, "
            f"which fits its own zero points"
        )
    if fmt == "int8" and config.group_size is not None and not entry.int8_groups:
        raise ValueError(
            f"group-wise int8 (group_size={config.group_size}) is quantized by method in "
            f"{sorted(n for n, m in METHODS.items() if m.int8_groups)}; got method={method!r} (use group_size=None)"
        )
    check_kernel(kernel, fmt, model.spec.device)
    if int8_layers:
        check_kernel(kernel, "int8", model.spec.device)
        if entry.weight is not None:  # a per-weight method must quantize int8 too: find out before any change
            try:
                entry.weight(torch.zeros(1, 8), int8_config(config))
            except ValueError as err:
                raise ValueError(f"int8_layers needs a method that also quantizes int8; method={method!r} "
                                 f"does not ({err})") from err  # fmt: skip
    if entry.needs_calibration and calibration is None:
        raise ValueError(
            f"method={method!r} needs calibration data: pass calibration=... (see its documentation)"
        )
    if calibration is not None and entry.model is None:  # a per-weight method never reads it: not ignored silently
        raise ValueError(f"calibration is only used by the calibrated methods {sorted(n for n, m in METHODS.items() if m.model)}"
                         f"; method={method!r} rounds each weight on its own: pass calibration=None or one of those")  # fmt: skip
    plan = plan_layers(model, config, skip, include, int8_layers, lm_head, hadamard_layers)
    check_materialized(model, plan)
    rotated = [name for name, c in plan.items() if c.hadamard]
    if rotated and entry.model is not None and not entry.rotates:
        raise ValueError(
            f"hadamard_layers needs a method that quantizes rotated layers: a per-weight one or one of "
            f"{rotating_methods()}; method={method!r} folds scales into other layers in the unrotated basis"
        )
    heads = set(output_head_names(model))
    if share_embedding is not None and not isinstance(share_embedding, bool):  # 1 == True: read as True before
        raise ValueError(f"share_embedding must be None, True or False; got {share_embedding!r}")
    head = tied_head(model)
    why_not = unshareable(plan[head]) if head in plan else None  # None (default) then keeps the float embedding
    share = head is not None and head in plan and share_embedding is not False and why_not is None
    if share_embedding and not share:
        raise ValueError(
            "share_embedding=True needs an output head that is tied to the input embedding and quantized "
            f"(lm_head='int8' quantizes it); this model's tied head: {head!r}, quantized layers include it: "
            f"{head in plan if head else False}" + (f"; {why_not} cannot serve as the embedding" if why_not else "")
        )
    options = check_method_options(method, entry.weight or entry.model, 2 if entry.weight else 3, method_options)
    snapshot = dict(model.linear_layers())
    hf: Any = model.module  # a transformers model: nn.Module's stubs type its methods as tensors or modules
    embedding = hf.get_input_embeddings() if share else None
    saved: dict[str, torch.Tensor] = {}  # parameters a model method rescaled (AWQ's RMSNorm weights)
    try:
        if entry.weight is not None:
            for name, layer_config in plan.items():
                linear = cast(nn.Linear, snapshot[name])  # plan_layers admits nn.Linear only
                if name in heads and layer_config.format != config.format:  # an int8 head: rounded, as the
                    qw = rtn_weight(linear.weight, layer_config)  # calibrated methods round it (round_outside)
                else:
                    weight = rotate(linear.weight.detach(), rotation_group(layer_config)) if layer_config.hadamard else linear.weight
                    qw = entry.weight(weight, layer_config, **options)
                bias = None if linear.bias is None else linear.bias.detach()
                new = module_class(layer_config.format).from_codes(
                    qw.codes, qw.scales, qw.zeros, config=layer_config, bias=bias, in_features=linear.in_features
                )
                new = new.to(linear.weight.device)
                _check_named_kernel(new, linear.weight)
                model.replace_linear(name, new)
        else:
            assert entry.model is not None  # a Method has exactly one of weight and model
            with rotated_inputs([cast(nn.Linear, snapshot[n]) for n in rotated], cast(int, config.group_size)):
                built = entry.model(model, plan, calibration, **options)
            modules = {n: m for n, m in built.items() if not isinstance(m, torch.Tensor)}
            missing = set(plan) - set(modules)
            if missing or not all(isinstance(m, QuantizedLinearBase) for m in modules.values()):
                raise RuntimeError(
                    f"method {method!r} must return a quantized module for every planned layer; "
                    f"missing {sorted(missing)[:3]}"
                )
            folded = _folded_parameters(model, plan, built)
            for name, value in folded.items():
                param = model.module.get_parameter(name)
                saved[name] = param.detach().clone()
                param.data.copy_(value)
            for name, module in modules.items():
                model.replace_linear(name, module)
        if share:
            share_tied_embedding(model, cast(str, head))
    except BaseException:
        for name, module in snapshot.items():
            model.replace_linear(name, module)
        if embedding is not None:
            hf.set_input_embeddings(embedding)
        for name, value in saved.items():
            model.module.get_parameter(name).data.copy_(value)
        raise
    return model


def check_method_options(method: str, fn: Any, fixed: int, options: Any, arg: str = "method_options") -> dict[str, Any]:
    """``options`` (argument ``arg``: ``None`` or a mapping) as a new dict; ``ValueError`` when it is not a mapping,
    or naming any key ``fn`` does not take, with the ones it does.

    ``fixed``: leading arguments ``quantize`` passes itself (``weight, config`` or ``model, plan, calibration``).
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{arg} must be None or a dict of method={method!r}'s options; got {options!r}")
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(options)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in params[fixed:] if p.kind in named]
    unknown = sorted(set(options) - set(accepted), key=repr)  # keys of any type: 1 and 'a' do not compare
    if unknown:
        raise ValueError(f"{arg} {unknown} are not options of method={method!r}; it takes {accepted}")
    return dict(options)


def _folded_parameters(model: CausalLM, plan: dict[str, QuantConfig], built: dict[str, Any]) -> dict[str, Any]:
    """The float tensors a model method returned for parameters outside the planned layers, checked."""
    params = dict(model.module.named_parameters())
    folded = {n: t for n, t in built.items() if isinstance(t, torch.Tensor)}
    for name, value in folded.items():
        if name not in params or any(name.startswith(layer + ".") for layer in plan):
            raise RuntimeError(f"a model method returned a tensor for {name!r}, which is no parameter outside the plan")
        if value.shape != params[name].shape:
            raise RuntimeError(
                f"a model method returned shape {tuple(value.shape)} for {name!r} of shape {tuple(params[name].shape)}"
            )
    return folded
