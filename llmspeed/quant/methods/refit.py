"""Least-squares scales for fixed codes: the last step of ``"gptq"``, ``"awq"`` and ``"awq+gptq"``.

Once a calibrated method has chosen each weight's code, a row's dequantized weight is linear in its
groups' scales: ``deq_r = sum_g s_rg * p_rg`` with ``p_rg`` the row's grid values ``(code - zero)``
(int4) or ``NF4_CODEBOOK[code]`` (NF4) on group ``g``'s columns and 0 elsewhere. The layer output
error of the row on the calibration activations is then a quadratic in its scales::

    e_r(s) = (W_r - deq_r) H (W_r - deq_r)^T = c_r - 2 b_r.s + s^T M_r s
    M_r[g, h] = p_rg H p_rh^T        b_r[g] = p_rg H W_r^T

with ``H = 2 X^T X / N`` the Hessian the method already has. :func:`refit_scales` solves
``M_r s = b_r`` for every row at once and keeps a row's new scales only where all are positive and
its error is lower, so the refit never increases the objective the method minimized. Codes and
(integer) zero points do not change: the result packs into the same modules and still exports to
compressed-tensors and GPTQ folders, whose zero points must be whole numbers.

GPTQ fits a group's scale once, before its columns absorb the rounding errors of earlier ones; the
refit sees the finished codes and the whole row's cross-group terms. Its cost is one ``[rows, in, in]``
contraction per layer, done in chunks of rows (``out * in^2`` multiply-adds).
"""

from __future__ import annotations

import torch

from .. import primitives as P

_CHUNK_ELEMENTS = 1 << 26  # fp32 elements of the largest temporary per chunk of rows (256 MB)


def grid_values(
    fmt: str, scales: torch.Tensor, zeros: torch.Tensor, dequantized: torch.Tensor
) -> torch.Tensor:  # [out, n, G]
    """The grid value of every weight, ``dequantized / scale`` snapped to the format's grid, exactly.

    ``scales``/``zeros`` ``[out, n]``, ``dequantized`` ``[out, n, G]``: int4 ``code - zero``, int8
    ``code``, NF4 ``NF4_CODEBOOK[code]``; 0 where a scale is not positive.
    """
    live = scales[..., None] > 0  # [out, n, 1]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # [out, n]
    out_f, n, G = dequantized.shape
    flat = dequantized.reshape(out_f, n * G)  # [out, n * G]
    # The format's own quantize primitives: the same codes pack_result will store.
    if fmt == "int4":
        p = P.quantize_int4(flat, safe, zeros, G).float().view(out_f, n, G) - zeros[..., None]
    elif fmt == "int8":
        p = P.quantize_int8(flat, safe[:, 0]).float().view(out_f, n, G)
    elif fmt == "nf4":
        idx = P.quantize_nf4(flat, safe, G)  # [out, n * G]
        p = P.NF4_CODEBOOK.to(flat.device)[idx.long()].view(out_f, n, G)
    else:
        raise ValueError(f"fmt must be 'int4', 'int8' or 'nf4'; got {fmt!r}")
    return torch.where(live, p, torch.zeros_like(p))


def refit_scales(
    weight: torch.Tensor,  # [out, in]
    hessian: torch.Tensor,  # [in, in]
    fmt: str,
    scales: torch.Tensor,  # [out, groups]
    zeros: torch.Tensor,  # [out, groups] (int4's zero points; ignored by int8 and NF4)
    dequantized: torch.Tensor,  # [out, in]: scales times the grid values
    group_size: int | None,
    *,
    rows_per_chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # scales [out, groups], deq [out, in], changed [out]
    """Scales minimizing each row's output error for the codes in ``dequantized``; see the module docstring.

    Returns the new scales, the dequantized weight they give (the same grid values times the new
    scales, computed as the format's ``dequantize`` does) and which rows changed. Rows whose solution
    has a scale ``<= 0`` or a higher error keep theirs.
    """
    out_f, in_f = weight.shape
    n = scales.shape[1]
    G = in_f if group_size is None else group_size
    in_pad = n * G
    if in_pad < in_f or in_pad - in_f >= G:
        raise ValueError(
            f"scales {tuple(scales.shape)} do not match weight {tuple(weight.shape)} at group_size={group_size}"
        )
    pad = in_pad - in_f
    W = torch.nn.functional.pad(weight.detach().float(), (0, pad))  # [out, in_pad]
    s0 = scales.float()
    deq = torch.nn.functional.pad(dequantized.float(), (0, pad)).view(out_f, n, G)  # [out, n, G]
    p = grid_values(fmt, s0, zeros.float(), deq)  # [out, n, G]
    H = torch.nn.functional.pad(hessian.detach().float(), (0, pad, 0, pad))  # [in_pad, in_pad]
    Hb = H.view(in_pad, n, G)  # [in_pad, n, G]: column blocks by group
    WH = W @ H  # [out, in_pad]
    b = (p * WH.view(out_f, n, G)).sum(-1)  # [out, n]
    c = (WH * W).sum(-1)  # [out]
    new = s0.clone()
    chunk = max(1, min(rows_per_chunk, _CHUNK_ELEMENTS // (in_pad * n)))  # y below: [chunk, in_pad, n]
    eye = torch.eye(n, device=W.device)
    for a in range(0, out_f, chunk):
        rows = slice(a, a + chunk)
        pc = p[rows]  # [R, n, G]
        y = torch.einsum("rhj,ihj->rih", pc, Hb)  # [R, in_pad, n]: H p_rh^T for every group h
        M = torch.einsum("rgi,rgih->rgh", pc, y.view(-1, n, G, n))  # [R, n, n]
        reg = 1e-6 * M.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)  # [R]: singular groups (all zero)
        x = torch.linalg.solve(M + reg[:, None, None] * eye, b[rows] + reg[:, None] * s0[rows])  # [R, n]
        x = x if fmt == "int8" else P.fp16_grid(x)  # 4-bit scales are stored in fp16
        lower = _row_error(x, M, b[rows], c[rows]) < _row_error(s0[rows], M, b[rows], c[rows])  # [R]
        keep = (x > 0).all(-1) & lower
        new[rows] = torch.where(keep[:, None], x, s0[rows])
    changed = (new != s0).any(-1)  # [out]
    out = (p * new[..., None]).view(out_f, in_pad)[:, :in_f].contiguous()  # [out, in]
    return new, out, changed


def _row_error(s: torch.Tensor, M: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # [R]
    """``c - 2 b.s + s^T M s`` per row: a row's output error at scales ``s`` [R, n]."""
    return c - 2 * (b * s).sum(-1) + torch.einsum("rg,rgh,rh->r", s, M, s)
