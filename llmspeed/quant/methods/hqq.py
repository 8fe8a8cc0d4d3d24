"""HQQ, half-quadratic quantization (Badri & Shaji, 2023): calibration-free int4 with optimized zero points.

Round-to-nearest takes each group's ``[min, max]`` range as given. HQQ keeps the scale but moves the
(fractional) zero point to minimize a sparsity-promoting ``l_p`` norm (``p < 1``) of the weight
error, so that a few outliers do not drag the whole group's grid. The non-convex problem is split
(half-quadratic splitting) with an auxiliary error ``E`` that is solved in closed form
by a generalized soft threshold, alternating with the zero point, also in closed form::

    repeat:  Q = clamp(round(W / s + z), 0, 15)                  codes for the current zero
             E = shrink_p(W - (Q - z) s, beta)                    sparse part of the error
             z = mean_group(Q - (W - E) / s)                      zero that best explains the rest
             beta = kappa * beta

No data, no Hessian: a few elementwise passes over the weights. The result is the int4 layout of
:mod:`llmspeed.quant.primitives` with fractional zero points (allowed there), so ``Int4Linear``,
its kernels, save/load and LoRA work unchanged. Only int4 is supported: NF4 and int8 are
symmetric and have no zero point to optimize.
"""

from __future__ import annotations

import torch

from .. import primitives as P
from ..config import QuantConfig
from .registry import QuantizedWeight, check_options, register_method

SUPPORTED_FORMATS = ("int4",)


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft threshold: the proximal step of ``|x|^p / beta`` (``sign(x) relu(|x| - |x|^(p-1) / beta)``)."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-12).pow(p - 1) / beta)


def hqq_int4(
    w: torch.Tensor,  # [out, in_pad]
    group_size: int | None,
    *,
    valid: torch.Tensor | None = None,  # [in_pad] bool: False for padding columns
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ codes uint8 ``[out, in_pad]``, scales and fractional zeros ``[out, groups]`` of padded ``w``.

    Padding columns (``valid`` False) neither set the range nor vote on the zero point; their codes
    are whatever represents 0.0 best. Keeps the iterate with the smallest ``l_p`` error (HQQ's early stop).
    """
    out_f, in_pad = w.shape
    G = in_pad if group_size is None else group_size
    Wg = w.detach().float().reshape(out_f, in_pad // G, G)  # [out, groups, G] (-1 cannot be inferred for out = 0)
    mask = torch.ones(in_pad, dtype=torch.bool) if valid is None else valid
    mask = mask.to(w.device).reshape(1, -1, G).expand_as(Wg)  # [out, groups, G]
    count = mask.sum(-1).clamp_min(1)  # [out, groups]
    big = torch.finfo(torch.float32).max
    lo = torch.where(mask, Wg, big).amin(-1)  # [out, groups]
    hi = torch.where(mask, Wg, -big).amax(-1)
    # a (near-)constant group far from 0 would need a zero point past fp16 (inf weights): its range holds 0, as RTN's
    far = P.fp16_grid(-lo / P.group_scales_grid((hi - lo) / 15)).isinf()  # [out, groups]
    lo, hi = torch.where(far, lo.clamp_max(0), lo), torch.where(far, hi.clamp_min(0), hi)
    scale = P.group_scales_grid((hi - lo) / 15)  # [out, groups], positive, on the stored fp16 grid
    zero = -lo / scale  # fractional, code domain
    s, mf = scale[..., None], mask.float()

    def codes_for(z: torch.Tensor) -> torch.Tensor:
        return torch.round(Wg / s + z[..., None]).clamp_(0, 15)  # [out, groups, G]

    def lp_error(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # [out, groups]
        return ((Wg - (q - z[..., None]) * s).abs().pow(p) * mf).sum(-1)

    def stored_error(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # as Int4Linear stores z: fp16
        zs = P.fp16_grid(z)
        return zs, lp_error(codes_for(zs), zs)

    best_zero, best_err = stored_error(zero)  # iterates are compared as stored, so the kept one never loses
    for _ in range(iters):
        q = codes_for(zero)
        e = shrink_lp(Wg - (q - zero[..., None]) * s, beta, p)  # [out, groups, G]
        zero = ((q - (Wg - e) / s) * mf).sum(-1) / count
        beta *= kappa
        stored, err = stored_error(zero)
        better = err < best_err
        best_zero = torch.where(better, stored, best_zero)
        best_err = torch.where(better, err, best_err)
    codes = codes_for(best_zero).to(torch.uint8).reshape(out_f, in_pad)  # nearest for the stored zero
    return codes, scale, best_zero


def hqq_weight(
    weight: torch.Tensor,
    config: QuantConfig,
    *,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
) -> QuantizedWeight:
    """Per-weight entry for :func:`llmspeed.quantize` (``method="hqq"``); see the module docstring."""
    if config.format not in SUPPORTED_FORMATS:
        raise ValueError(
            f"method 'hqq' supports formats {list(SUPPORTED_FORMATS)} (it optimizes the int4 zero point); "
            f"got format={config.format!r}: use method='gptq' or 'rtn' for it"
        )
    check_options(float, "a number in (0, 1]", lambda v: 0 < v <= 1, p=p)
    check_options(float, "a finite number > 0", lambda v: v > 0, beta=beta)
    check_options(float, "a finite number >= 1", lambda v: v >= 1, kappa=kappa)
    check_options(int, "an integer >= 0", lambda v: v >= 0, iters=iters)
    in_f = weight.shape[1]
    in_pad = config.padded_in_features(in_f)
    w = P.pad_columns(weight.detach().float(), in_pad)  # [out, in_pad]
    valid = torch.arange(in_pad) < in_f
    codes, scales, zeros = hqq_int4(
        w, config.group_size, valid=valid, p=p, beta=beta, kappa=kappa, iters=iters
    )
    return QuantizedWeight(codes, scales, zeros)


register_method("hqq", weight=hqq_weight)
