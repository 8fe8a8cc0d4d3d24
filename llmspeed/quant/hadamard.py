"""The Hadamard rotation within quantization groups: a layer's input, and its weight's columns, in another basis.

``x @ W.T == rotate(x) @ rotate(W).T`` for any ``W``, because :func:`rotate` multiplies every block of
``group`` consecutive channels by ``H = hadamard(group)``, which is symmetric and orthonormal (so it is its
own inverse). Quantizing ``rotate(W)`` instead of ``W`` (QuaRot's and SpinQuant's online rotation of the
down projections' input, kept inside each scale group) spreads a channel the calibration text rarely
excites over the whole group, which is where GPTQ's compensation otherwise parks error that text of
another kind brings back (measurements in docs/calibration.md). The quantized module then rotates its
input before the kernel (:attr:`~llmspeed.quant.QuantConfig.hadamard`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import QuantConfig


@lru_cache(maxsize=8)
def _sylvester(n: int) -> torch.Tensor:  # [n, n] fp64, entries +-1
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:  # [n, n]
    """The ``n x n`` Sylvester Hadamard matrix over ``sqrt(n)``: symmetric, orthonormal; ``n`` a power of two."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two; got {n!r}")
    return (_sylvester(n) / n**0.5).to(dtype=dtype, device=device)


@lru_cache(maxsize=32)
def _cached(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:  # [n, n], never written to
    # rotate() runs in every forward of a rotated layer: build (and copy to the device) once, not per call,
    # which also keeps host-to-device copies out of CUDA graph capture after the first (eager) call
    return hadamard(n, dtype, device)


def rotate(x: torch.Tensor, group: int) -> torch.Tensor:  # [..., k] -> [..., k]
    """``x`` with every block of ``group`` channels of its last axis multiplied by ``hadamard(group)``.

    Applied to a weight ``[out, in]`` it rotates the columns; applied twice it gives ``x`` back (up to rounding).
    """
    k = x.shape[-1]
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or group & (group - 1):
        raise ValueError(f"group must be a power of two (1, 2, 4, ...); got group={group!r}")
    if k % group:
        raise ValueError(f"the last axis ({k}) must be a multiple of group={group}")
    h = _cached(group, x.dtype if x.is_floating_point() else torch.float32, x.device)
    return (x.reshape(*x.shape[:-1], k // group, group) @ h).reshape(x.shape)  # [..., k/g, g] @ [g, g]


def check_rotatable(name: str, in_features: int, group: int | None) -> None:
    """``ValueError`` unless layer ``name``'s input can be rotated within groups of ``group`` channels."""
    if group is None or group < 1 or group & (group - 1) or in_features % group:
        raise ValueError(
            f"hadamard rotates each quantization group's channels, so it needs a power-of-two group_size that "
            f"divides in_features; layer {name!r} has in_features={in_features}, group_size={group}"
        )


def rotation_group(config: QuantConfig) -> int:
    """The channels a ``hadamard`` config rotates together: its ``group_size`` (:class:`~.config.QuantConfig` refuses
    ``hadamard`` without a power-of-two one)."""
    if config.group_size is None:
        raise ValueError(f"hadamard rotates within quantization groups, so it needs a group_size; got {config}")
    return config.group_size


@contextmanager
def rotated_inputs(linears: Sequence[nn.Linear], group: int) -> Iterator[None]:
    """Inside the block, each of ``linears`` holds ``rotate(W)`` and rotates its input first (a forward pre-hook
    registered before any the caller adds, so the caller's hooks see the rotated input): the same function.
    Weights and hooks are restored on exit, however the block ends.

    The rotated weight is a new parameter, not new data in the old one: a module tied to that parameter (the input
    embedding of a tied output head) keeps reading the unrotated rows, and the tie is back on exit."""
    saved = [lin.weight for lin in linears]
    hooks = []
    try:
        for lin in linears:
            w = lin.weight
            lin.weight = nn.Parameter(rotate(w.detach(), group), requires_grad=w.requires_grad)  # [out, in]
            hooks.append(lin.register_forward_pre_hook(lambda _m, args: (rotate(args[0], group), *args[1:])))
        yield
    finally:
        for h in hooks:
            h.remove()
        for lin, w in zip(linears, saved):
            lin.weight = w
