"""``prepare`` and ``convert``: quantization-aware training in two verbs around any fine-tuning run.

::

    qat.prepare(model, "int4", group_size=64)    # linears -> FakeQuantLinear (scales chosen by init)
    llmspeed.finetune(model, texts, steps=100, precision="bf16")
    qat.convert(model)                           # FakeQuantLinear -> Int4Linear, what quantize() makes

``prepare`` plans the layers exactly as :func:`llmspeed.quantize` with ``lm_head=None`` does (same
``skip``/``include``, the output head left in float, the same errors), so the converted model is
indistinguishable from a post-training quantized one: same modules, kernels, files, adapters and generator.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from ..model import as_model
from ..names import format_name
from ..protocol import CausalLM, holds_step_lock, is_quantized
from ..quant import primitives as P
from ..quant.api import check_materialized, check_method_options, plan_layers
from ..quant.config import DEFAULT_GROUP_SIZE, QuantConfig, refuse_default_marker
from ..quant.hadamard import rotate, rotated_inputs, rotation_group
from ..quant.methods import get_method
from ..quant.modules import QuantizedLinearBase, module_class
from ..quant.plan import _matches, output_head_names
from .fake_quant import CODE_RANGE, FakeQuantLinear, init_qparams

FORMATS = tuple(CODE_RANGE)  # ("int4", "int8")
INITS = ("rtn", "gptq")
_DEFAULT = object()


def _fake_layer(module: nn.Module) -> FakeQuantLinear | None:
    """The FakeQuantLinear at a linear position, directly or as a LoRA wrapper's base layer."""
    while not isinstance(module, FakeQuantLinear) and hasattr(module, "base_layer"):
        module = cast(nn.Module, module.base_layer)
    return module if isinstance(module, FakeQuantLinear) else None


def fake_quant_layers(model: CausalLM) -> Iterator[tuple[str, FakeQuantLinear]]:
    """``(qualified name, FakeQuantLinear)`` of every prepared linear position."""
    for name, module in as_model(model).linear_layers():  # a transformers model is wrapped, as in prepare
        layer = _fake_layer(module)
        if layer is not None:
            yield name, layer


def is_prepared(model: CausalLM) -> bool:
    """True when :func:`prepare` has put fake-quantized layers into ``model``."""
    return any(True for _ in fake_quant_layers(model))


def _check_args(fmt: object, symmetric: object, init: object, learn_scales: object) -> bool:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)} for quantization-aware training; got {fmt!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}; got {init!r}")
    if not isinstance(learn_scales, bool):
        raise ValueError(f"learn_scales must be a bool; got {learn_scales!r}")
    if symmetric is None:
        return fmt == "int8"
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be a bool or None (the format's default); got {symmetric!r}")
    if fmt == "int8" and not symmetric:
        raise ValueError("symmetric=False is not available for int8, which is symmetric per output channel")
    return symmetric


def _check_include(model: CausalLM, include: object) -> None:
    """``ValueError`` for an ``include`` pattern that reaches only the output head, which ``prepare`` always leaves in
    float: it would be dropped without a word (or leave the unclear "no linear layer to quantize")."""
    if include is None or isinstance(include, str) or not isinstance(include, Iterable):
        return  # plan_layers names these
    heads = set(output_head_names(model))
    for p in include:
        reached = {n for n in model.linear_names() if isinstance(p, str) and _matches(n, [p])}
        if reached and reached <= heads:
            raise ValueError(
                f"include pattern {p!r} matches only the output head {sorted(reached)[0]!r}, which qat.prepare "
                f"always leaves in float (quantize(..., lm_head=None)'s plan); leave it out of include"
            )


def _gptq_start(model: CausalLM, plan: dict[str, QuantConfig], calibration: Any, options: dict) -> dict[str, Any]:
    """GPTQ's modules for ``plan`` (the model is not modified): their grids and on-grid weights are the start.

    Rotated layers (``hadamard``) are fitted in the rotated basis, as ``quantize`` does."""
    build = get_method("gptq").model
    assert build is not None  # GPTQ registers a model-level function
    layers = dict(model.linear_layers())
    rotated = [cast(nn.Linear, layers[n]) for n, c in plan.items() if c.hadamard]
    group = next((c.group_size for c in plan.values() if c.hadamard), None)
    with rotated_inputs(rotated, cast(int, group)):
        built = build(model, plan, calibration, **options)
    missing = set(plan) - set(built)
    if missing or not all(isinstance(m, QuantizedLinearBase) for m in built.values()):
        raise RuntimeError(f"GPTQ returned no quantized module for {sorted(missing)[:3]}")
    return built


@holds_step_lock
def prepare(
    model: CausalLM,
    fmt: str,
    group_size: int | None | Any = _DEFAULT,
    symmetric: bool | None = None,
    init: str = "rtn",
    *,
    learn_scales: bool = False,
    skip: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    hadamard_layers: Sequence[str] | None = None,
    calibration: Any = None,
    init_options: dict[str, Any] | None = None,
) -> CausalLM:
    """Swap ``model``'s linear layers for :class:`FakeQuantLinear` in place, ready to fine-tune; return the model.

    Args:
        model: A float :class:`~llmspeed.protocol.CausalLM` (not quantized, not prepared, no adapters yet).
        fmt: ``"int4"`` (group-wise) or ``"int8"`` (per output channel, symmetric).
        group_size: Input channels per scale: default 64 for int4, ``None`` for int8 (as ``quantize``).
        symmetric: int4 only: zero point fixed at code 8 (``scale = max(-min / 8, max / 7)``, as ``quantize``'s) instead of the
            asymmetric min/max grid ``quantize`` uses. Default: asymmetric int4, symmetric int8.
        init: Where the grids (and, for ``"gptq"``, the weights) start: ``"rtn"`` takes round-to-nearest's
            scales and zeros of the float weight (converting at once gives exactly ``quantize(model, fmt, lm_head=None)``);
            ``"gptq"`` runs GPTQ on ``calibration`` and starts from its on-grid weights and grids
            (converting at once gives exactly ``quantize(model, fmt, method="gptq", lm_head=None)``).
        learn_scales: Each group's scale (and, for asymmetric int4, its zero point) learns, with the codes
            fixed on the starting grid: the group moves smoothly while the latent weights flip codes
            only after drifting half a step. The converted module stores the learned values (fractional
            zero points, as HQQ's). Recommended with ``init="gptq"``: see docs/qat.md.
        skip, include: As :func:`llmspeed.quantize`: names or patterns left in float, or the only ones
            prepared. The output head always stays in float (``quantize(..., lm_head=None)``'s plan).
        hadamard_layers: int4 only, as :func:`llmspeed.quantize`: layers trained and packed in a basis rotated
            within each group (``QuantConfig.hadamard``): the latent weight is the rotated one, forward rotates
            the input first, and ``convert`` gives the rotated ``Int4Linear`` ``quantize`` would.
        calibration: ``init="gptq"``: calibration text or token ids (default: the calibration mix, :func:`llmspeed.eval.calibration_mix`).
        init_options: ``init="gptq"``: options of the GPTQ method (``n_sequences``, ``seq_len``, ...).

    Raises:
        ValueError: unknown format or init, a model already quantized or already prepared, bad
            ``group_size``/``skip``/``include``: before any layer changes. If preparing fails midway,
            every layer is restored.
    """
    model, fmt = as_model(model), format_name(fmt)  # a transformers model is wrapped; "INT4" is "int4"
    init = format_name(init)  # "RTN" is "rtn", as the format (and quantize's method) is spelled in any case
    symmetric = _check_args(fmt, symmetric, init, learn_scales)
    if fmt == "int8" and group_size is not _DEFAULT and group_size is not None:
        raise ValueError(  # the fake quantizer trains int8 with a scale per row (group-wise int8 is quantize's)
            f"group_size must be None for int8 in quantization-aware training (one scale per output row); got {group_size!r}"
        )
    if is_prepared(model):
        raise ValueError("model is already prepared for quantization-aware training; call qat.convert(model) first")
    quantized = [name for name, m in model.linear_layers() if is_quantized(m)]
    if quantized:
        raise ValueError(
            f"model is already quantized ({len(quantized)} layers, e.g. {quantized[0]!r}); "
            f"prepare the float model for quantization-aware training instead"
        )
    if init_options is not None and init != "gptq":
        raise ValueError(f"init_options are options of init='gptq'; got init={init!r}")
    init_options = check_method_options("gptq", get_method("gptq").model, 3, init_options, "init_options")
    if calibration is not None and init != "gptq":
        raise ValueError(f"calibration is only used by init='gptq'; got init={init!r}")
    refuse_default_marker(group_size)
    if group_size is _DEFAULT:
        group_size = DEFAULT_GROUP_SIZE[fmt]
    config = QuantConfig(fmt, group_size, method=init, symmetric=symmetric)  # converted modules say so (exports)
    _check_include(model, include)
    plan = plan_layers(model, config, skip, include, lm_head=None, hadamard_layers=hadamard_layers)
    check_materialized(model, plan)
    snapshot = dict(model.linear_layers())
    try:
        # the layers' tensors (latent weights, grids, learnable gains) are built outside inference mode also when
        # the caller is in it: inference tensors cannot be trained ("cannot be saved for backward")
        with torch.inference_mode(False), torch.no_grad():
            built = _gptq_start(model, plan, calibration, init_options) if init == "gptq" else {}
            for name in plan:
                linear = cast(nn.Linear, snapshot[name])  # plan_layers admits nn.Linear only
                start, layer_config = built.get(name), plan[name]
                if start is None:
                    w = linear.weight.detach()  # [out, in]
                    # rotated in the model's dtype, as quantize rotates it: the latent weight holds exactly these values
                    w = (rotate(w, rotation_group(layer_config)) if layer_config.hadamard else w).float()
                    w = P.pad_columns(w, config.padded_in_features(linear.in_features))  # [out, in_pad]
                    scales, zeros = init_qparams(w, config, symmetric)  # [out, groups] x2
                    layer = FakeQuantLinear(linear, layer_config, scales, zeros, symmetric, learn_scales)
                    if layer_config.hadamard:  # a new parameter: the float model's own weight tensor is never written
                        layer.weight = nn.Parameter(w.to(linear.weight.dtype), linear.weight.requires_grad)
                else:
                    scales = start.scales.reshape(linear.out_features, -1)  # int8: [out] -> [out, 1]
                    zeros = start.zeros if fmt == "int4" else torch.zeros_like(scales)
                    layer = FakeQuantLinear(linear, layer_config, scales, zeros, symmetric, learn_scales)
                    # a new parameter: the float model's own weight tensor is never written; the stored basis
                    on_grid = start.packed_dequantize(linear.weight.dtype) if layer_config.hadamard else \
                        start.dequantize(linear.weight.dtype)  # fmt: skip
                    layer.weight = nn.Parameter(on_grid, linear.weight.requires_grad)
                model.replace_linear(name, layer.to(linear.weight.device))
    except BaseException:
        for name, module in snapshot.items():
            model.replace_linear(name, module)
        raise
    return model


def convert_layer(layer: FakeQuantLinear) -> QuantizedLinearBase:
    """The packed module holding ``layer``'s fake-quantized weight: codes from its scales and zeros."""
    if not isinstance(layer, FakeQuantLinear):
        raise TypeError(f"layer must be a FakeQuantLinear (from llmspeed.qat.prepare); got {type(layer).__name__}")
    config = layer.config
    codes = layer.codes()  # [out, in_pad] on the starting grid, as forward chooses them
    scales = layer.effective_scales().detach().float()  # [out, groups]
    if config.format == "int8":
        codes, zeros, scales = codes[:, : layer.in_features], None, scales[:, 0]  # [out, in], [out]
    else:
        zeros = layer.effective_zeros().detach().float()  # [out, groups]
    bias = None if layer.bias is None else layer.bias.detach()
    module = module_class(config.format).from_codes(
        codes, scales, zeros, config=config, bias=bias, in_features=layer.in_features
    )
    return module.to(layer.weight.device)


@holds_step_lock
def convert(model: CausalLM) -> CausalLM:
    """Replace every :class:`FakeQuantLinear` with the packed ``Int4Linear``/``Int8Linear`` it trained for.

    The converted module's ``dequantize()`` equals the fake-quantized weight bit for bit. A LoRA
    adapter added after :func:`prepare` keeps wrapping its layer (now the packed base). Raises
    ``ValueError`` when ``model`` was never prepared; all or nothing.
    """
    model = as_model(model)  # a transformers model is wrapped, as prepare did
    layers = list(fake_quant_layers(model))
    if not layers:
        raise ValueError("model has no fake-quantized layers; call llmspeed.qat.prepare(model, ...) first")
    built = [(name, layer, convert_layer(layer)) for name, layer in layers]  # may raise: nothing changed yet
    for name, layer, packed in built:
        holder = dict(model.linear_layers())[name]
        if holder is layer:
            model.replace_linear(name, packed)
            continue
        wrapper: Any = holder  # a LoRA wrapper (or a chain of them): swap the innermost base in place
        while wrapper.base_layer is not layer:
            wrapper = wrapper.base_layer
        wrapper.base_layer = packed
    return model
