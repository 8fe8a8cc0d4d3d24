"""The Hessian of a linear layer's reconstruction error, summed over calibration activations.

For ``||W X - Q X||^2 / N`` the Hessian with respect to one weight row is ``2 X X^T / N``, the same for
every row. The calibration machinery sums it batch by batch (:func:`accumulate_hessian`) and scales it
once at the end (:func:`finalize_hessian`); GPTQ consumes the result.
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
