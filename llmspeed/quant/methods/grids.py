"""The formats' code grids as GPTQ and AWQ search them (built on :mod:`llmspeed.quant.primitives`): fit a
group's scale and zero, with an optional clip (range shrink) search, round a column to the grid, encode it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Protocol

import torch

from .. import primitives as P


class Grid(Protocol):
    """A format's code grid as GPTQ needs it: fit a group's qparams, round a column, decode it."""

    def fit(
        self, w: torch.Tensor, error=...
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [out, k] -> scale [out], zero [out]
        """Scale and zero point of one group of columns (zero is all-zero for symmetric formats)."""
        ...

    def fake_quantize(
        self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
    ) -> torch.Tensor:  # [out]
        """The nearest grid value of each element of one column ``w`` [out] (the GPTQ hot path)."""
        ...



def weight_error(diff: torch.Tensor) -> torch.Tensor:  # [rows, k] -> [rows]
    """``sum |w - q|^2.4`` per row: the GPTQ reference's ``mse`` criterion for a group's range."""
    return diff.abs().pow(2.4).sum(1)


def search_clip(
    w: torch.Tensor,  # [rows, k]
    shrinks: tuple[float, ...],
    choose,
    fake_quantize,
    error=weight_error,
) -> tuple[torch.Tensor, torch.Tensor]:  # scale [rows], zero [rows]
    """The clip (range shrink) search shared by the grids: per row, the shrink of ``shrinks`` whose grid
    gives the smallest ``error(q - w)`` (``[rows, k] -> [rows]``; default :func:`weight_error`).

    ``choose(w) -> (scale [rows], zero [rows])`` fits a grid to the shrunk values; each shrink is
    evaluated on the original ``w``. A single shrink of ``1.0`` is the plain fit, without evaluating.
    """
    best_s: torch.Tensor | None = None
    best_z: torch.Tensor | None = None
    best_err: torch.Tensor | None = None
    for shrink in shrinks:
        s, z = choose(w * shrink)
        if len(shrinks) == 1:
            return s, z
        err = error(fake_quantize(w, s[:, None], z[:, None]) - w)  # [rows]
        if best_s is None or best_z is None or best_err is None:
            best_s, best_z, best_err = s, z, err
        else:
            better = err < best_err
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
            best_err = torch.where(better, err, best_err)
    if best_s is None or best_z is None:
        raise ValueError(f"shrinks must be a non-empty tuple of shrink factors; got {shrinks!r}")
    return best_s, best_z


def check_shrinks(clip_search: tuple[float, ...]) -> tuple[float, ...]:
    """``clip_search`` as a tuple; ``ValueError`` unless it is a non-empty tuple (or list) of numbers in (0, 1]."""
    if not isinstance(clip_search, (tuple, list)) or not clip_search or not all(
        isinstance(c, numbers.Real) and not isinstance(c, bool) and 0 < c <= 1 for c in clip_search
    ):
        raise ValueError(f"clip_search must be a non-empty tuple of shrink factors in (0, 1]; got {clip_search!r}")
    return tuple(clip_search)



class Int4Grid:
    """Asymmetric 4-bit codes ``[0, 15]``, zero point in the code domain (the int4 layout).

    Args:
        clip_search: Shrink factors of the group's ``[min, max]`` range tried by :meth:`fit`; the one
            with the smallest error wins (:func:`search_clip`; by default ``sum |w - deq(q(w))|^2.4``
            per row, the GPTQ reference's ``mse`` option). ``(1.0,)`` is plain min/max, exactly
            round-to-nearest's choice.
        symmetric: Zero point 8 and scale ``max(-min / 8, max / 7)`` (``QuantConfig.symmetric``).
        headroom: With ``symmetric``: scale ``absmax / 7.5`` instead, GPTQ's reference rule, whose half step past the
            range takes the error feedback of the group's later columns (measured: docs/quantization.md, symmetric int4).
    """

    def __init__(self, clip_search: tuple[float, ...] = (1.0,), symmetric: bool = False, headroom: bool = False):
        self.clip_search = check_shrinks(clip_search)
        self.symmetric = symmetric
        self.headroom = headroom

    def fit(self, w: torch.Tensor, error=weight_error) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row scale and zero ``[out]`` of the group ``w`` [out, k]; ``error`` scores a clip (see :func:`search_clip`)."""
        choose = P.choose_qparams_int4
        if self.symmetric:
            choose = P.choose_qparams_int4_symmetric_absmax if self.headroom else P.choose_qparams_int4_symmetric

        def fit_one(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s, z = choose(v, None)  # [out, 1] each
            return s[:, 0], z[:, 0]

        return search_clip(w, self.clip_search, fit_one, self.fake_quantize, error)

    affine_codes = (0.0, 15.0, True)  # GPTQ's C++ column loop: code range, zero point added and removed

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``(clamp(round(w / s) + z, 0, 15) - z) * s`` elementwise."""
        return torch.round(w / scale).add_(zero).clamp_(0, 15).sub_(zero).mul_(scale)

    def encode(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None):
        """Integer codes ``[out, in_pad]`` of on-grid ``w`` (padded) with ``[out, groups]`` qparams."""
        return P.quantize_int4(w, scales, zeros, group_size)


class NF4Grid:
    """NormalFloat-4 codebook times the group absmax (symmetric; zero is unused and returned as 0).

    Args:
        clip_search: Shrink factors of the group absmax tried by :meth:`fit` (values beyond the shrunk
            absmax round to the codebook's end); see :func:`search_clip`. ``(1.0,)``: plain absmax.
    """

    def __init__(self, clip_search: tuple[float, ...] = (1.0,)):
        self.clip_search = check_shrinks(clip_search)

    def fit(self, w: torch.Tensor, error=weight_error) -> tuple[torch.Tensor, torch.Tensor]:
        """Group absmax ``[out]`` (shrunk by the best clip) and a zero vector."""

        def fit_one(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = P.choose_qparams_nf4(v, None)[:, 0]  # [out]
            return s, torch.zeros_like(s)

        return search_clip(w, self.clip_search, fit_one, self.fake_quantize, error)

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Nearest codebook value of ``w / s``, times ``s``."""
        return P.NF4_CODEBOOK.to(w.device)[torch.bucketize((w / scale).contiguous(), P._NF4_MIDPOINTS.to(w.device))].mul_(scale)

    def encode(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None):
        """Codebook indices ``[out, in_pad]`` of on-grid ``w``."""
        return P.quantize_nf4(w, scales, group_size)


class Int8Grid:
    """Symmetric 8-bit codes ``[-127, 127]`` with one scale per output row (use ``group_size=None``)."""

    def fit(self, w: torch.Tensor, error=weight_error) -> tuple[torch.Tensor, torch.Tensor]:
        """Row scale ``absmax / 127`` ``[out]`` and a zero vector."""
        s = P.choose_qparams_int8(w)  # [out]
        return s, torch.zeros_like(s)

    affine_codes = (-127.0, 127.0, False)  # GPTQ's C++ column loop: code range, no zero point

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``clamp(round(w / s), -127, 127) * s``."""
        return torch.round(w / scale).clamp_(-127, 127).mul_(scale)

    def encode(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None):
        """int8 codes ``[out, in]`` of on-grid ``w`` (``scales`` ``[out, 1]``)."""
        return P.quantize_int8(w, scales.reshape(-1))


def grid_for(fmt: str, clip_search: tuple[float, ...] = (1.0,), symmetric: bool = False, headroom: bool = False) -> Grid:
    """The :class:`Grid` of a format name (``"int4"``, ``"nf4"``, ``"int8"``); ``symmetric``: int4's zero fixed at 8
    (``headroom``: GPTQ's ``absmax / 7.5`` scale, see :class:`Int4Grid`).

    ``clip_search`` applies to int4 and NF4 (int8 keeps the row absmax: 255 levels need no clipping).
    """
    grids: dict[str, Callable[[], Grid]] = {"int4": lambda: Int4Grid(clip_search, symmetric, headroom), "nf4": lambda: NF4Grid(clip_search), "int8": Int8Grid}
    if fmt not in grids:
        raise ValueError(f"format must be one of {sorted(grids)} for GPTQ; got {fmt!r}")
    return grids[fmt]()
