"""Least-squares group ranges (``method="mse"``): data-free int4 whose scales and fractional zero points are fitted.

Round-to-nearest stores each group's ``[min, max]`` (stretched to hold 0) as its grid: the two extreme weights
land exactly on codes 0 and 15, and everything between takes whatever error that spacing gives it. This method
fits the grid to the group instead. For a few candidate spacings around min/max's (``candidates`` of them,
from ``spread`` steps narrower to ``spread`` steps wider over the group's range), it rounds the group to codes
and fits the affine map ``w ~ scale * code + offset`` to those codes by least squares: two unknowns, closed
form. Then ``refine`` rounds alternate rounding to the fitted grid and fitting again. Every candidate is scored
by its squared weight error *as stored* (fp16 scale and zero point, codes nearest for them), and the best one
per group is kept; round-to-nearest's own grid is the first candidate, so no group ends worse than RTN in
squared error. llama.cpp chooses the scales and mins of its K-quants by a search of this kind.

The fitted offset is rarely a whole number of steps, so the zero points are fractional (``Int4Linear`` and
every kernel take them, as for HQQ); checkpoint formats that store integer zero points (compressed-tensors,
GPTQ) refuse such a model by name. docs/quantization.md measures it against RTN, HQQ and llama.cpp's Q4_0.
"""

from __future__ import annotations

import torch

from .. import primitives as P
from ..config import QuantConfig
from .registry import QuantizedWeight, register_method

SUPPORTED_FORMATS = ("int4",)
ROWS = 256  # rows fitted at once: bounds the working memory to a few copies of 256 rows
_FP16_TINY, _FP16_MAX = 2.0**-24, 65504.0  # smallest positive and largest finite fp16: what can be stored


def _fit(x: torch.Tensor, mask: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares ``(scale, offset)`` [rows, groups] of ``x ~ scale * q + offset`` over ``mask``ed values, and
    whether the fit is usable (two distinct codes and a positive scale)."""
    n = mask.sum(-1)  # [rows, groups] (mask broadcasts)
    sq, sx = (mask * q).sum(-1), (mask * x).sum(-1)
    sqq, sqx = (mask * q * q).sum(-1), (mask * q * x).sum(-1)
    det = n * sqq - sq * sq
    ok = det > 0
    det = torch.where(ok, det, torch.ones_like(det))
    scale = (n * sqx - sq * sx) / det
    offset = (sqq * sx - sq * sqx) / det
    return scale, offset, ok & (scale > 0)


def _stored(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fitted ``scale``/``offset`` as ``Int4Linear`` stores them: fp16 scale, fp16 zero point in code units."""
    s = P.fp16_grid(scale.clamp(_FP16_TINY, _FP16_MAX))
    return s, P.fp16_grid((-offset / s).clamp(-_FP16_MAX, _FP16_MAX))


def _codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # [rows, groups, G] fp32 codes
    return torch.round(x / s[..., None] + z[..., None]).clamp_(0, 15)


def _error(x: torch.Tensor, mask: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # [rows, groups]
    return (mask * ((_codes(x, s, z) - z[..., None]) * s[..., None] - x) ** 2).sum(-1)


def _fit_rows(x: torch.Tensor, mask: torch.Tensor, candidates: int, spread: float, refine: int):
    """Best stored ``(scale, zero)`` [rows, groups] of ``x`` [rows, groups, G] (see the module docstring)."""
    big = torch.finfo(torch.float32).max
    lo = torch.where(mask > 0, x, big).amin(-1).clamp_max(0.0)  # [rows, groups]
    hi = torch.where(mask > 0, x, -big).amax(-1).clamp_min(0.0)
    best_s = P.group_scales_grid((hi - lo) / 15)  # round-to-nearest's grid: the first candidate
    best_z = torch.round(-lo / best_s).clamp_(0, 15)
    best_e = _error(x, mask, best_s, best_z)

    def consider(scale: torch.Tensor, offset: torch.Tensor, ok: torch.Tensor) -> None:
        nonlocal best_s, best_z, best_e
        s, z = _stored(torch.where(ok, scale, best_s), torch.where(ok, offset, -best_z * best_s))
        e = _error(x, mask, s, z)
        better = ok & (e < best_e)
        best_s, best_z, best_e = (torch.where(better, a, b) for a, b in ((s, best_s), (z, best_z), (e, best_e)))

    span = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)  # [rows, groups]
    for i in range(candidates):
        steps = 15 - spread + (2 * spread * i / (candidates - 1) if candidates > 1 else spread)
        q = torch.round((x - lo[..., None]) * (steps / span)[..., None]).clamp_(0, 15)  # [rows, groups, G]
        consider(*_fit(x, mask, q))
    for _ in range(refine):
        consider(*_fit(x, mask, _codes(x, best_s, best_z)))
    return best_s, best_z


def mse_int4(
    w: torch.Tensor,  # [out, in_pad]
    group_size: int | None,
    *,
    valid: torch.Tensor | None = None,  # [in_pad] bool: False for padding columns
    candidates: int = 11,
    spread: float = 0.5,
    refine: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 ``[out, in_pad]``, fp16-valued scales and fractional zeros ``[out, groups]`` of padded ``w``.

    Padding columns (``valid`` False) neither set the range nor count in the fit; their codes are the nearest
    to 0.0 on the group's grid.
    """
    out_f, in_pad = w.shape
    G = in_pad if group_size is None else group_size
    keep = torch.ones(in_pad, dtype=torch.bool) if valid is None else valid
    mask = keep.to(w.device, torch.float32).reshape(1, -1, G)  # [1, groups, G]
    scales, zeros = [], []
    for rows in torch.split(w.detach().float(), ROWS):
        s, z = _fit_rows(rows.reshape(rows.shape[0], -1, G), mask, candidates, spread, refine)
        scales.append(s)
        zeros.append(z)
    s, z = torch.cat(scales), torch.cat(zeros)  # [out, groups] x2
    codes = _codes(w.detach().float().reshape(out_f, -1, G), s, z).to(torch.uint8).reshape(out_f, in_pad)
    return codes, s, z


def mse_weight(
    weight: torch.Tensor, config: QuantConfig, *, candidates: int = 11, spread: float = 0.5, refine: int = 2
) -> QuantizedWeight:
    """Per-weight entry for :func:`llmspeed.quantize` (``method="mse"``); see the module docstring.

    Args:
        candidates: Spacings tried per group (at least 1), evenly from ``spread`` steps narrower than
            round-to-nearest's to ``spread`` steps wider (over the 15 steps of the group's range).
        spread: How far the candidate spacings reach, in steps of the range (``0 <= spread < 15``).
        refine: Rounds of rounding to the best grid and fitting again (``>= 0``).
    """
    if config.format not in SUPPORTED_FORMATS:
        raise ValueError(
            f"method 'mse' supports formats {list(SUPPORTED_FORMATS)} (it fits the int4 zero point); "
            f"got format={config.format!r}: use method='gptq' or 'rtn' for it"
        )
    if not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be an int >= 1; got {candidates!r}")
    if not 0 <= spread < 15:
        raise ValueError(f"spread must be in [0, 15) steps; got {spread!r}")
    if not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an int >= 0; got {refine!r}")
    in_f = weight.shape[1]
    in_pad = config.padded_in_features(in_f)
    w = P.pad_columns(weight.detach().float(), in_pad)  # [out, in_pad]
    valid = torch.arange(in_pad) < in_f
    codes, scales, zeros = mse_int4(
        w, config.group_size, valid=valid, candidates=candidates, spread=spread, refine=refine
    )
    return QuantizedWeight(codes, scales, zeros)


register_method("mse", weight=mse_weight)
