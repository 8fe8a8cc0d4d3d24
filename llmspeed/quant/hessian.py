"""The Hessian of a linear layer's reconstruction error, summed over calibration activations.

For ``||W X - Q X||^2 / N`` the Hessian with respect to one weight row is ``2 X X^T / N``, the same for
every row. The calibration machinery sums it batch by batch (:func:`accumulate_hessian`) and scales it
once at the end (:func:`finalize_hessian`); GPTQ consumes the result. :func:`float_target_map` turns the
error against the float model's output, ``||W X_float - Q X||^2``, into that same form.
"""

from __future__ import annotations

import torch


def accumulate_hessian(hessian: torch.Tensor, x: torch.Tensor) -> int:
    """Add ``x^T x`` of a batch of activations ``x`` (``[..., in]``) to ``hessian`` in place; return rows added.

    Only the upper triangle is multiplied, in column blocks, and mirrored: about 0.65x the work of
    ``x.T @ x`` for ``in >= 512`` (the result is the same symmetric matrix). The caller scales by
    ``2 / N`` at the end (:func:`finalize_hessian`); summing unscaled avoids re-weighting on every batch.
    """
    x2 = x.reshape(-1, x.shape[-1]).to(hessian.dtype)  # [N, in]
    n = x2.shape[1]
    b = max(128, -(-n // 4))  # columns per block
    for i in range(0, n, b):
        blk = x2[:, i : i + b].T @ x2[:, i:]  # [b, in - i]: the diagonal block, then the blocks right of it
        hessian[i : i + b, i:] += blk
        if i + b < n:
            hessian[i + b :, i : i + b] += blk[:, b:].T
    return x2.shape[0]


def finalize_hessian(hessian_sum: torch.Tensor, rows: int) -> torch.Tensor:
    """``2 / N * sum(x^T x)``: the Hessian of ``||W X - Q X||^2 / N`` for one weight row."""
    if rows <= 0:
        raise ValueError(f"rows must be positive (no calibration activations reached this layer); got {rows}")
    return hessian_sum * (2.0 / rows)


def float_target_map(
    x_float: torch.Tensor, x: torch.Tensor, hessian: torch.Tensor, damp: float
) -> torch.Tensor:
    """``T`` ``[in, in]`` such that ``W T`` on the inputs ``x`` best reproduces ``W`` on the float model's ``x_float``.

    ``x_float`` and ``x`` (``[..., in]``, the same tokens in the same order) are what one linear
    receives in the float model and in the model quantized up to it. ``W* = W T`` solves the ridge
    problem ``min ||x W*^T - x_float W^T||^2 + lam ||W* - W||^2`` for every row at once:
    ``T = (C + lam I) (H + lam I)^-1`` with ``C = 2 x_float^T x / N``, ``H = 2 x^T x / N`` (``hessian``)
    and ``lam = damp * mean(diag H)``. Because the part of ``W x_float`` outside the row space of ``x``
    is a constant, GPTQ on ``W*`` with ``H`` minimizes ``||W x_float - Q x||^2``, the output error against
    the float model rather than against the layer's own float weights on quantized inputs (GPTAQ's
    "asymmetric calibration", Li et al. 2025). With ``x_float == x``, ``T = I``.
    """
    if x_float.shape != x.shape:
        raise ValueError(
            f"x_float and x must have one shape; got {tuple(x_float.shape)} and {tuple(x.shape)}"
        )
    if damp <= 0:
        raise ValueError(f"damp must be positive; got {damp}")
    xf = x_float.reshape(-1, x_float.shape[-1]).to(hessian.dtype)  # [N, in]
    xq = x.reshape(-1, x.shape[-1]).to(hessian.dtype)  # [N, in]
    h = hessian.double()  # the solve in float64: H + lam I may be ill-conditioned, and [in, in] is cheap
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)  # [in, in]
    mean = float(h.diagonal().mean())
    lam = damp * (mean if mean > 0 else 1.0)  # H = 0 (x all zero, so C = 0): any lam > 0 gives T = I
    cross = (xf.T @ xq).double() * (2.0 / xq.shape[0]) + lam * eye  # [in, in]: C + lam I
    # T = (C + lam I) (H + lam I)^-1, and (H + lam I) is symmetric: solve (H + lam I) T^T = (C + lam I)^T
    return torch.linalg.solve(h + lam * eye, cross.T).T.to(hessian.dtype)  # [in, in]
