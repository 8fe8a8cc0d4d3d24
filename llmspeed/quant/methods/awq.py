"""AWQ, activation-aware weight quantization (Lin et al., 2023), and AWQ followed by GPTQ.

A few input channels carry much larger activations than the rest; rounding the weights that meet
them costs the most output error. AWQ multiplies each input channel ``j`` of a weight by
``s_j = mean|x_j|^alpha`` (normalized so that ``max(s) * min(s) = 1``), quantizes ``W diag(s)`` and
divides the input by ``s``: the salient channels get finer steps, relative to their size, at the
cost of the others. ``alpha`` is searched on a grid (``n_grid`` points in ``[0, 1)``, plus ``s = 1``)
per group of linears fed the same tensor, minimizing that group's output error on the calibration
activations, ``||X W^T - X (Q(W diag s) / s)^T||^2``, computed from the Hessian ``H = 2 X^T X / N``
as ``sum((D H) * D)`` with ``D = Q(W s)/s - W``: the very objective GPTQ minimizes. Because ``s = 1``
is a candidate, the search never does worse than plain rounding on that objective.

The division by ``s`` is folded into the op producing the input (RMSNorm weights, ``up_proj`` /
``v_proj`` rows: :mod:`~llmspeed.quant.methods.awq_fold`), so the result is the ordinary int4 / NF4 /
int8 module, kernels and files, plus rescaled RMSNorm weights, which ``llmspeed.quantize`` installs
with the modules (and ``llmspeed.save`` stores with the model).

Per group, after the search:

* ``method="awq"``: round ``W diag(s)`` to the grid group by group; with ``clip_search`` (by default
  :data:`AWQ_CLIP`) each group's range shrink is chosen by the group's own output error ``d H_gg d^T`` (AWQ's clip search, on the
  Hessian's diagonal block instead of sampled tokens).
* ``method="awq+gptq"``: GPTQ on ``W diag(s)`` with the Hessian of the scaled input,
  ``H / (s s^T)``: the scales decide which channels get fine steps, GPTQ then compensates each
  rounding error on the columns not yet quantized.

Layers run through the same one-pass, true-sequential loop as GPTQ
(:func:`~llmspeed.quant.calibration.quantize_sequentially`): each group's statistics come from the
inputs the already-quantized groups and layers produce.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .. import primitives as P
from ..calibration import (
    LinearGroup,
    capture_layer_inputs,
    decoder_layers,
    layer_hessians,
    quantize_sequentially,
    run_layer,
    split_plan,
)
from ..calibration_data import CalibrationConfig, calibration_tokens
from ..config import QuantConfig
from .awq_fold import SUPPORTED, Fold, candidate_folds, check_fold
from .gptq import GPTQResult, check_gptq_options, gptq_quantize, pack_result, refit, round_outside
from .grids import Grid, grid_for, weight_error
from .registry import check_options, register_method

AWQ_CLIP = (1.0, 0.95, 0.9, 0.85, 0.8)  # method="awq"'s default range shrinks (searched per group)


def grid_quantize(
    w: torch.Tensor,  # [out, in]
    grid: Grid,
    config: QuantConfig,
    hessian: torch.Tensor | None = None,  # [in, in]
) -> GPTQResult:
    """Round ``w`` to ``config``'s groups on ``grid`` (round-to-nearest, with the grid's clip search).

    The clip search scores a group by its output error ``d H_gg d^T`` (``H_gg``: the group's diagonal
    block of ``hessian``) when ``hessian`` is given, else by :func:`~.grids.weight_error`. Columns are
    zero-padded to whole groups as round-to-nearest does, so with one shrink of ``1.0`` the result is
    exactly ``method="rtn"``'s.
    """
    out_f, in_f = w.shape
    in_pad = config.padded_in_features(in_f)
    wp = P.pad_columns(w.float(), in_pad)  # [out, in_pad]
    g = in_pad if config.group_size is None else config.group_size
    n = in_pad // g
    error = weight_error
    if hessian is not None:
        hp = torch.nn.functional.pad(
            hessian.float(), (0, in_pad - in_f, 0, in_pad - in_f)
        )  # [in_pad, in_pad]
        blocks = torch.stack([hp[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(n)])  # [n, g, g]

        def error(diff: torch.Tensor) -> torch.Tensor:  # [out * n, g] -> [out * n]
            d = diff.view(out_f, n, g)
            return torch.einsum("ong,ngh,onh->on", d, blocks, d).reshape(-1)

    rows = wp.reshape(out_f * n, g)  # [out * n, g]
    s, z = grid.fit(rows, error)  # [out * n] each
    deq = grid.fake_quantize(rows, s[:, None], z[:, None]).view(out_f, in_pad)[:, :in_f]
    return GPTQResult(scales=s.view(out_f, n), zeros=z.view(out_f, n), dequantized=deq.contiguous())


def output_error(
    weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor, inputs: torch.Tensor | None = None
) -> float:
    """``||X W^T - X A^T||^2 / N`` from the Hessian ``2 X^T X / N`` (halved back): the layer output error.

    ``inputs``: ``X`` ``[N, in]`` itself; with fewer tokens than input channels the error is computed from
    it (``N in out`` multiply-adds instead of ``in^2 out``), the same value up to rounding.
    """
    d = (approx - weight).float()  # [out, in]
    if inputs is not None and inputs.shape[0] < inputs.shape[1]:
        return float((inputs.float() @ d.T).square().sum()) / inputs.shape[0]  # [N, out] summed
    return 0.5 * float(((d @ hessian) * d).sum())


def search_scales(
    weight: torch.Tensor,  # [out, in]
    hessian: torch.Tensor,  # [in, in]
    abs_mean: torch.Tensor,  # [in]
    quantize,
    *,
    n_grid: int = 20,
    duo_scaling: bool = False,
    fold: Fold | None = None,
    inputs: torch.Tensor | None = None,  # [N, in]
) -> tuple[torch.Tensor, float]:  # s [in], its output error
    """AWQ's grid search: the input scale ``s`` minimizing :func:`output_error` of ``quantize(W s) / s``.

    Candidates: ``s = 1`` and ``s = x^alpha`` (``duo_scaling``: ``x^alpha / w^(1 - alpha)``, ``w`` the
    mean of ``|W|`` relative to its row's absmax, after AutoAWQ's ``duo_scaling``) for
    ``alpha = i / n_grid``, each normalized by ``sqrt(max(s) min(s))``. The grid is searched coarse to
    fine: every ``n_grid // 5``-th point, then every point between the best one's coarse neighbours
    (12 evaluations instead of 21 for ``n_grid=20``; the error is smooth in ``alpha``). ``fold.tie``
    ties channels that share one producer channel (grouped-query attention).
    ``quantize(w [out, in]) -> [out, in]`` rounds to the grid. ``inputs``: the activations ``hessian`` was
    summed from, which :func:`output_error` scores with when there are fewer of them than input channels.
    """
    w = weight.float()
    x = abs_mean.float().clamp_min(1e-8)  # [in]
    if fold is not None:
        x = fold.tie_stat(x)
    w_stat = None
    if duo_scaling:
        w_stat = (w.abs() / w.abs().amax(1, keepdim=True).clamp_min(1e-8)).mean(0).clamp_min(1e-8)  # [in]
        if fold is not None:
            w_stat = fold.tie_stat(w_stat)

    def scale(i: int) -> torch.Tensor:  # [in]
        alpha = i / n_grid
        s = x.pow(alpha) if w_stat is None else x.pow(alpha) / w_stat.pow(1 - alpha)
        s = s.clamp_min(1e-4)
        return s / (s.max() * s.min()).sqrt()

    errors: dict[int, float] = {}

    def score(i: int) -> float:
        if i not in errors:
            s = scale(i)
            errors[i] = output_error(w, quantize(w * s) / s, hessian, inputs)
        return errors[i]

    step = max(1, n_grid // 5)
    coarse = min(range(0, n_grid, step), key=score)
    fine = min(range(max(0, coarse - step + 1), min(n_grid, coarse + step)), key=score)
    identity = output_error(w, quantize(w), hessian, inputs)
    if identity <= errors[fine]:
        return torch.ones_like(x), identity
    return scale(fine), errors[fine]


def plan_folds(model, plan: dict, tokens: torch.Tensor) -> tuple[list[Fold], list[Fold]]:
    """The folds of the first planned decoder layer, each checked on real activations; raises if AWQ cannot fold.

    Decoder layers of one model share their structure, so the first planned one speaks for all. A norm
    fold that fails its check is a ``ValueError`` (AWQ would have nowhere to put q/k/v's or gate/up's
    scales); a row fold that fails is dropped (o_proj / down_proj are then quantized unscaled).
    """
    per_layer, _ = split_plan(model, plan)
    first = next((i for i, names in enumerate(per_layer) if names), None)
    if first is None:
        return [], []
    _, layers = decoder_layers(model)
    probe = capture_layer_inputs(model, tokens[:1, :16], 1)
    for i in range(first):
        probe = run_layer(layers[i], probe)
    layer, names = layers[first], per_layer[first]
    _, groups = layer_hessians(layer, probe, list(names))
    norms, rows = candidate_folds(layer, groups)
    if not norms:
        raise ValueError(
            f"method='awq' finds no RMSNorm feeding the planned linears of decoder layer {first} "
            f"(groups {sorted(sorted(g) for g in groups.values())}); it supports {SUPPORTED}. "
            f"Quantize all of q/k/v or gate/up together, or use method='gptq'"
        )
    for fold in norms:
        if not check_fold(layer, probe, fold):
            raise ValueError(
                f"method='awq' cannot fold input scales into {fold.producer!r}: dividing its weight by s does "
                f"not divide the input of {sorted(fold.consumers)} by s (a (1 + w) norm?); it supports {SUPPORTED}"
            )
    return norms, [f for f in rows if check_fold(layer, probe, f)]


def awq_model(
    model,
    plan: dict,
    calibration: Any = None,
    *,
    n_sequences: int = 128,
    seq_len: int = 128,
    n_grid: int = 20,
    duo_scaling: bool = False,
    clip_search: tuple[float, ...] | None = None,
    gptq: bool = False,
    refit_scales: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    float_targets: bool = True,
    target_damp: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """AWQ over a whole model (``method="awq"``; ``gptq=True`` is ``method="awq+gptq"``).

    Args:
        model: The float :class:`~llmspeed.protocol.CausalLM` (not modified; ``quantize`` installs the result).
        plan: ``{qualified name: QuantConfig}`` from :func:`llmspeed.quant.plan_layers`.
        calibration: ``None`` (the default mix of registers), a string, a list of strings, or token ids.
        n_sequences, seq_len: See :class:`~llmspeed.quant.calibration_data.CalibrationConfig`.
        n_grid: Points of the ``alpha`` grid in ``[0, 1)``.
        duo_scaling: Divide the scales by a weight statistic too (AutoAWQ's ``duo_scaling``).
        clip_search: int4 / NF4: shrink factors of each group's range; with ``method="awq"`` scored by
            the group's output error, with ``"awq+gptq"`` as GPTQ scores them. ``None``:
            :data:`AWQ_CLIP` for ``"awq"`` (AWQ clips by default), ``(1.0,)`` (no clipping) with GPTQ.
        gptq: Quantize the scaled weights with GPTQ instead of rounding them.
        refit_scales: Then refit each row's scales by least squares for its codes, on the scaled
            input's Hessian (:mod:`~llmspeed.quant.methods.refit`); codes and zero points stay.
        damp, block_size, act_order: GPTQ's options (``gptq=True`` only).
        float_targets, target_damp: Fit each layer to the float model's output first, as GPTQ's options
            of those names (:func:`~llmspeed.quant.hessian.float_target_map`); the scale search then runs
            on the fitted weights.
        progress: Show a progress bar over decoder layers.

    Returns ``{name: module}`` for every planned layer and ``{parameter name: tensor}`` for each RMSNorm
    weight that absorbed scales. Planned linears outside the decoder stack are rounded to nearest.
    """
    cal = CalibrationConfig(n_sequences, seq_len)
    check_options(int, "a positive integer", lambda v: v > 0, n_grid=n_grid)
    flags = dict(duo_scaling=duo_scaling, gptq=gptq, refit_scales=refit_scales, act_order=act_order, progress=progress)
    shrinks = ((1.0,) if gptq else AWQ_CLIP) if clip_search is None else clip_search
    shrinks = check_gptq_options(shrinks, damp, block_size, target_damp, float_targets=float_targets, **flags)
    tokens = calibration_tokens(model, calibration, cal)  # [n, seq_len]; raises on bad input first
    norm_folds, row_folds = plan_folds(model, plan, tokens)
    fold_of = {f.consumers: f for f in norm_folds + row_folds}
    producers = {f.producer: f for f in row_folds}
    results: dict[str, tuple[GPTQResult, QuantConfig, torch.Tensor | None]] = {}  # row producers, pre-fold
    row_scales: dict[str, torch.Tensor] = {}  # qualified producer -> its rows' divisor
    params: dict[str, torch.Tensor] = {}  # qualified norm weight -> folded value

    def quantize_group(group: LinearGroup, config: QuantConfig):
        symmetric = bool(config.symmetric and config.format == "int4")
        grid = grid_for(config.format, shrinks, symmetric, headroom=symmetric and gptq)  # GPTQ's scale under GPTQ
        plain = grid_for(config.format, (1.0,), symmetric)
        weight = torch.cat([lin.weight.detach().float() for lin in group.linears])  # [sum out, in]
        prefix = group.qualified[0][: -len(group.names[0]) - 1]
        fold = fold_of.get(frozenset(group.names))
        if fold is not None and fold.kind == "rows" and f"{prefix}.{fold.producer}" not in plan:
            fold = None  # the first layer's fold, but this layer's producer stays in float: nowhere to put 1/s
        s = torch.ones(weight.shape[1], device=weight.device)
        if fold is not None:
            s, _ = search_scales(
                weight,
                group.hessian,
                group.abs_mean,
                lambda w: grid_quantize(w, plain, config).dequantized,
                n_grid=n_grid,
                duo_scaling=duo_scaling,
                fold=fold,
                inputs=group.inputs,
            )
        scaled_h = group.hessian / (s[:, None] * s[None, :])  # [in, in]: Hessian of the input x / s
        scaled_w = weight * s  # [sum out, in]
        if gptq:
            result = gptq_quantize(
                scaled_w,
                scaled_h,
                grid,
                config.group_size,
                damp=damp,
                block_size=block_size,
                act_order=act_order,
            )
        else:
            result = grid_quantize(scaled_w, grid, config, scaled_h if len(shrinks) > 1 else None)
        if refit_scales:
            result = refit(result, scaled_w, scaled_h, config)
        if fold is not None and fold.kind == "norm":
            norm = model.module.get_parameter(f"{prefix}.{fold.producer}.weight")
            params[f"{prefix}.{fold.producer}.weight"] = (norm.detach().float() / s.to(norm.device)).to(
                norm.dtype
            )
        elif fold is not None:
            row_scales[f"{prefix}.{fold.producer}"] = fold.producer_scale(s)
        modules, row = [], 0
        for rel, qname, lin in zip(group.names, group.qualified, group.linears):
            rows = slice(row, row + lin.out_features)
            part = GPTQResult(result.scales[rows], result.zeros[rows], result.dequantized[rows])
            bias = None if lin.bias is None else lin.bias.detach()
            if rel in producers:
                results[qname] = (part, config, bias)
            module = pack_result(part, config, bias).to(lin.weight.device)
            exact = config.format != "nf4" or not config.double_quant
            deq = part.dequantized if exact else module.dequantize()
            modules.append((module, deq / s.to(deq.device)))  # the pass goes on with the unscaled function
            row += lin.out_features
        return modules

    built: dict[str, Any] = quantize_sequentially(
        model,
        plan,
        tokens,
        quantize_group,
        "awq",
        progress,
        float_targets=float_targets,
        target_damp=target_damp,
    )
    for name, r in row_scales.items():  # fold o_proj's / down_proj's scales into v_proj / up_proj rows
        part, config, bias = results[name]
        r = r.to(part.scales.device)[:, None]  # [out, 1]
        folded = GPTQResult(part.scales / r, part.zeros, part.dequantized / r)
        new_bias = None if bias is None else bias / r[:, 0].to(bias.dtype)
        built[name] = pack_result(folded, config, new_bias).to(built[name].qweight.device)
    built.update(round_outside(model, plan))
    built.update(params)
    return built


def awq_gptq_model(model, plan: dict, calibration: Any = None, **options: Any) -> dict[str, Any]:
    """``method="awq+gptq"``: AWQ's scales, then GPTQ on the scaled weights (see :func:`awq_model`)."""
    if "gptq" in options:
        raise ValueError("method='awq+gptq' always runs GPTQ; pass gptq=... only with method='awq'")
    return awq_model(model, plan, calibration, gptq=True, **options)


_sig = inspect.signature(awq_model)  # quantize checks method_options against this signature
_options = [p for n, p in _sig.parameters.items() if n != "gptq"]
awq_gptq_model.__signature__ = _sig.replace(parameters=_options)  # type: ignore[attr-defined]


register_method("awq", model=awq_model, symmetric=True)
register_method("awq+gptq", model=awq_gptq_model, symmetric=True)
