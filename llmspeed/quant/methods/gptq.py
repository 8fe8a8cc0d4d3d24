"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

The layer objective is ``||W X - Q X||^2`` over calibration activations ``X`` (``[in, N]``); its
Hessian w.r.t. a weight row is ``H = 2 X X^T`` (``[in, in]``), the same for every row, so one
Cholesky factor serves the whole matrix. The pure functions here work on tensors only; the
model-level driver (sequential over decoder layers) is :func:`quantize_model` at the bottom.

Layout contract (same as round-to-nearest)
-------------------------------------------
Codes come back as ``[out, in]`` integers in the format's code domain, scales and zeros as
``[out, num_groups]``; the group of a column is always ``column // group_size`` **by its original
index**, even with ``act_order=True``. Act-order only changes the order in which columns are
*visited* (largest Hessian diagonal first); a group's scale and zero are fitted at the moment its
first column is visited, on the current (error-updated) values of all its columns, and stay fixed
after that. So the packed module needs no permutation index and runs the same kernels.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import primitives as P
from ..calibration import (
    LinearGroup,
    quantize_sequentially,
    split_plan,
)
from ..calibration_data import CalibrationConfig, calibration_tokens
from ..kernels import cpp
from ..modules import module_class
from .grids import Grid, check_shrinks, grid_for
from .refit import refit_scales
from .registry import check_options, register_method
from .rtn import nf4_effective_scales, rtn_weight


@dataclass(frozen=True)
class GPTQResult:
    """What :func:`gptq_quantize` returns: everything the packed module needs, plus the oracle.

    Attributes:
        scales: ``[out, num_groups]`` float32.
        zeros: ``[out, num_groups]`` float32 zero points in the code domain (all zero for symmetric grids).
        dequantized: ``[out, in]`` float32: every value lies on its group's grid, so the format's own
            ``quantize`` recovers the integer codes exactly (:meth:`Grid.encode`).
    """

    scales: torch.Tensor
    zeros: torch.Tensor
    dequantized: torch.Tensor


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, retrying with more damping if needed."""
    n = hessian.shape[0]
    mean_diag = hessian.diagonal().mean().clamp_min(1e-8)
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    for attempt in range(6):
        h = hessian + (damp * 10**attempt) * mean_diag * eye  # [in, in]
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)  # [in, in]
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(
        f"Hessian is not positive definite even with damp={damp * 10**5}; check the calibration data"
    )


def gptq_quantize(
    weight: torch.Tensor,  # [out, in]
    hessian: torch.Tensor,  # [in, in]
    grid: Grid,
    group_size: int | None,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` with GPTQ given the layer Hessian; see the module docstring for the layout.

    Args:
        weight: Float weight ``[out, in]`` (not modified).
        hessian: ``2 X X^T / N`` from :func:`finalize_hessian`, ``[in, in]``.
        grid: The format's qparam fitting and rounding (:mod:`llmspeed.quant.methods.grids`).
        group_size: Columns per scale group (by original index); ``None`` for one group per row.
        damp: Added to the diagonal as a fraction of its mean (the paper's lambda, 1%).
        block_size: Columns per lazy batch: errors inside a block are applied at once, outside it
            as one matrix product per block.
        act_order: Visit columns by decreasing Hessian diagonal (groups stay by original index).
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"hessian must be [in, in] for weight [out, in]; got weight {tuple(weight.shape)}, "
            f"hessian {tuple(hessian.shape)}"
        )
    if group_size is not None and group_size <= 0:
        raise ValueError(f"group_size must be positive or None; got {group_size}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive; got {block_size}")
    out_f, in_f = weight.shape
    G = in_f if group_size is None else group_size
    n_groups = -(-in_f // G)
    H = hessian.detach().to(torch.float32).clone()  # [in, in]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0  # inputs that never fire: any value works, no error is pushed from them

    perm = (
        torch.argsort(H.diagonal(), descending=True, stable=True)
        if act_order
        else torch.arange(in_f, device=H.device)
    )
    inv_perm = torch.argsort(perm)
    # Work on W^T so that a column of W is a contiguous row: [in, out] in visiting order.
    Wt = (
        weight.detach().to(H.device, torch.float32).T[perm].contiguous()
    )  # [in, out], becomes the error-updated weight
    H = H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp)  # [in, in] upper
    columns = _column_loop(grid)
    with _single_thread():  # thousands of tiny ops: thread hand-offs cost more than they save
        scales = torch.zeros(n_groups, out_f)  # [groups, out]: a group's row is fitted when it is first visited
        zeros = torch.zeros(n_groups, out_f)
        fitted = [False] * n_groups
        groups = perm // G  # [in] int64: group of the column visited at each position
        group_of_pos = groups.tolist()

        for i1 in range(0, in_f, block_size):
            i2 = min(i1 + block_size, in_f)
            W1 = Wt[i1:i2]  # [b, out] view: updates land in Wt
            Hinv1 = Hinv[i1:i2, i1:i2]  # [b, b]
            E = torch.zeros(i2 - i1, out_f)  # [b, out]: each column's error, scaled by its diagonal
            i = 0
            while i < i2 - i1:
                g = group_of_pos[i1 + i]
                if not fitted[g]:
                    pos = inv_perm[g * G : min((g + 1) * G, in_f)]  # positions of the group's columns
                    current = Wt[pos]  # [G, out] copy
                    late = pos >= i2  # columns past this block still miss this block's updates
                    if i > 0 and bool(late.any()):
                        current[late] -= Hinv[i1 : i1 + i, pos[late]].T @ E[:i]
                    scale, zero = grid.fit(current.T)
                    scales[g], zeros[g], fitted[g] = scale, zero, True
                j = i + 1  # a run of positions whose groups are all fitted
                while j < i2 - i1 and fitted[group_of_pos[i1 + j]]:
                    j += 1
                columns(W1, Hinv1, E, scales, zeros, groups[i1:i2], i, j)
                i = j
            if i2 < in_f:
                Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, E, alpha=-1.0)

    assert all(fitted)  # every column was visited: every group was fitted
    return GPTQResult(
        scales=scales.T.contiguous(),  # [out, groups]
        zeros=zeros.T.contiguous(),  # [out, groups]
        dequantized=Wt[inv_perm].T.contiguous(),  # [out, in]
    )


def _column_loop(grid: Grid):
    """GPTQ's loop over a run of columns whose groups are fitted: the C++ one (``kernels/gptq_columns.h``, in the
    ``cpp`` kernel's extension) for an affine grid (``grid.affine_codes``) where the extension is built, else
    :func:`_python_columns` (the same operations; its error updates round once more, so a few codes may differ)."""
    codes = getattr(grid, "affine_codes", None)
    ext = cpp.extension() if codes is not None else None
    if codes is None or ext is None:
        return lambda *args: _python_columns(grid, *args)
    lo, hi, with_zero = codes

    def run(W1, Hinv1, E, scales, zeros, groups, start, stop):
        ext.gptq_columns(W1, Hinv1, E, scales, zeros, groups, start, stop, lo, hi, with_zero)

    return run


def _python_columns(grid: Grid, W1: torch.Tensor, Hinv1: torch.Tensor, E: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor, groups: torch.Tensor, start: int, stop: int) -> None:  # fmt: skip
    """Quantize block positions ``[start, stop)`` of ``W1`` [b, out] in place, each column's error (scaled by its
    ``Hinv1`` diagonal) into ``E`` [b, out] and onto the block's later columns."""
    w_rows, h_rows = W1.unbind(0), Hinv1.unbind(0)  # views
    diag, group_of = Hinv1.diagonal().tolist(), groups.tolist()
    b = W1.shape[0]
    for i in range(start, stop):
        g = group_of[i]
        w = w_rows[i]  # [out]
        q = grid.fake_quantize(w, scales[g], zeros[g])  # [out]
        err = (w - q).div_(diag[i])  # [out]
        if i + 1 < b:
            W1[i + 1 :].addr_(h_rows[i][i + 1 :], err, alpha=-1.0)
        E[i] = err
        w.copy_(q)  # row i is final: Wt ends up holding Q


@contextmanager
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def layer_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """``||W X - Q X||_F`` over activations ``x`` (``[..., in]``): the quantity GPTQ minimizes."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)  # [N, in]
    return torch.linalg.matrix_norm(x2 @ (weight.float() - approx.float()).T).item()


def check_gptq_options(clip_search, damp: float, block_size: int, target_damp: float, **flags: bool) -> tuple:
    """``clip_search`` as a tuple; ``ValueError`` on a bad option GPTQ and AWQ share (``flags``: the bool ones)."""
    check_options(float, "a finite number > 0", lambda v: v > 0, damp=damp, target_damp=target_damp)
    check_options(int, "an integer > 0", lambda v: v > 0, block_size=block_size)
    check_options(bool, **flags)
    return check_shrinks(clip_search)


# --- packing into the quant package's modules -------------------------------------------------------
def refit(result: GPTQResult, weight: torch.Tensor, hessian: torch.Tensor, config) -> GPTQResult:
    """``result`` with least-squares scales for its codes (:func:`~.refit.refit_scales`); zeros unchanged.

    NF4 with double quantization keeps its scales: the stored ones are re-quantized afterwards.
    """
    if config.format == "nf4" and config.double_quant:
        return result
    scales, deq, _ = refit_scales(
        weight, hessian, config.format, result.scales, result.zeros, result.dequantized, config.group_size
    )
    return GPTQResult(scales, result.zeros, deq)


def pack_result(result: GPTQResult, config, bias: torch.Tensor | None):
    """The quantized module (``Int4Linear``/``NF4Linear``/``Int8Linear``) holding a :class:`GPTQResult`.

    The dequantized weight is on its groups' grids, so the format's own ``quantize`` primitive
    recovers the codes exactly; padding columns (``in`` rounded up to the group size) get the code
    of 0.0. NF4 with double quantization encodes against the double-quantized scales the module
    will store (the scales GPTQ saw differ from those by at most half an 8-bit step).
    """
    w = result.dequantized  # [out, in]
    in_f = w.shape[1]
    cls = module_class(config.format)
    if config.format == "int8":
        scales = result.scales.reshape(-1)  # [out]
        return cls.from_codes(
            P.quantize_int8(w, scales), scales, None, config=config, bias=bias, in_features=in_f
        )
    wp = P.pad_columns(w, config.padded_in_features(in_f))  # [out, in_pad]
    if config.format == "int4":
        codes = P.quantize_int4(wp, result.scales, result.zeros, config.group_size)
        return cls.from_codes(codes, result.scales, result.zeros, config=config, bias=bias, in_features=in_f)
    codes = P.quantize_nf4(wp, nf4_effective_scales(result.scales, config), config.group_size)
    return cls.from_codes(codes, result.scales, None, config=config, bias=bias, in_features=in_f)


# --- the model-level method: llmspeed.quantize(model, fmt, method="gptq", calibration=...) ---------
def gptq_model(
    model,
    plan: dict,
    calibration=None,
    *,
    n_sequences: int = 128,
    seq_len: int = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    clip_search: tuple[float, ...] = (1.0,),
    refit_scales: bool = True,
    float_targets: bool = True,
    target_damp: float = 0.1,
    progress: bool = True,
) -> dict:
    """GPTQ over a whole model, layer by layer (see :func:`~llmspeed.quant.calibration.quantize_sequentially`).

    Args:
        model: The float :class:`~llmspeed.protocol.CausalLM` (not modified; ``quantize`` installs the result).
        plan: ``{qualified name: QuantConfig}`` from :func:`llmspeed.quant.plan_layers`.
        calibration: ``None`` (the default mix of registers, :func:`llmspeed.eval.calibration_mix`), a string, a list of strings, or token ids.
        n_sequences, seq_len: See :class:`~llmspeed.quant.calibration_data.CalibrationConfig`.
        damp, block_size, act_order: See :func:`gptq_quantize`.
        clip_search: int4 and NF4: shrink factors of the group range tried when fitting a group.
        refit_scales: After GPTQ, refit each row's scales by least squares for its codes
            (:mod:`~llmspeed.quant.methods.refit`); codes and zero points stay.
        float_targets: Fit each layer to the float model's output, ``||W X_float - Q X||^2``, instead of
            its own float weights on the quantized model's inputs (:func:`~llmspeed.quant.hessian.float_target_map`):
            later layers compensate the errors of earlier ones. Costs one more float forward pass per layer.
        target_damp: The ridge ``lam`` of that fit, as a fraction of ``mean(diag H)``: how far ``W`` may move.
        progress: Show a progress bar over decoder layers.

    Linear layers outside the decoder stack (an output head that was not skipped) are rounded to
    nearest: their inputs are not captured.
    """
    cal = CalibrationConfig(n_sequences, seq_len)
    flags = dict(act_order=act_order, refit_scales=refit_scales, float_targets=float_targets, progress=progress)
    clip_search = check_gptq_options(clip_search, damp, block_size, target_damp, **flags)
    tokens = calibration_tokens(model, calibration, cal)  # [n, seq_len]; raises on bad input first

    def quantize_group(group: LinearGroup, config):
        linears = group.linears
        weight = torch.cat([lin.weight.detach() for lin in linears])  # [sum out, in]: rows are independent
        symmetric = bool(config.symmetric and config.format == "int4")
        grid = grid_for(config.format, clip_search, symmetric, headroom=symmetric)  # GPTQ's own symmetric scale
        result = gptq_quantize(
            weight, group.hessian, grid, config.group_size, damp=damp, block_size=block_size, act_order=act_order
        )
        if refit_scales:
            result = refit(result, weight, group.hessian, config)
        modules, row = [], 0
        for lin in linears:
            rows = slice(row, row + lin.out_features)
            part = GPTQResult(result.scales[rows], result.zeros[rows], result.dequantized[rows])
            bias = None if lin.bias is None else lin.bias.detach()
            module = pack_result(part, config, bias).to(lin.weight.device)
            exact = config.format != "nf4" or not config.double_quant  # else the stored scales moved
            modules.append((module, part.dequantized if exact else module.dequantize()))
            row += lin.out_features
        return modules

    built = quantize_sequentially(
        model,
        plan,
        tokens,
        quantize_group,
        "gptq",
        progress,
        float_targets=float_targets,
        target_damp=target_damp,
    )
    built.update(round_outside(model, plan))
    return built


def round_outside(model, plan: dict) -> dict:
    """Round-to-nearest modules for the planned linears outside the decoder stack (their inputs are not captured)."""
    _, outside = split_plan(model, plan)
    built = {}
    for name in outside:
        linear = model.module.get_submodule(name)
        qw = rtn_weight(linear.weight, plan[name])
        bias = None if linear.bias is None else linear.bias.detach()
        cls = module_class(plan[name].format)
        module = cls.from_codes(
            qw.codes, qw.scales, qw.zeros, config=plan[name], bias=bias, in_features=linear.in_features
        )
        built[name] = module.to(linear.weight.device)
    return built


register_method("gptq", model=gptq_model, symmetric=True, rotates=True)
