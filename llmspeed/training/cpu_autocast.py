"""16-bit autocast on CPUs without fast 16-bit GEMM: linear layers multiply in fp32 over 16-bit operands.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` a linear layer rounds its input, weight and bias to
bf16 and runs torch's bf16 GEMM, which accumulates in fp32 and rounds the output to bf16. On a CPU
without AVX512-BF16 or AMX that GEMM is emulated, and the product the backward pass needs for the input
gradient, ``grad @ W`` with ``W`` stored row-major, takes a slower path still: a bf16 training step there
cost several times an fp32 one (docs/qat.md has the measurements).

:class:`FastLinears`, a torch function mode, replaces each such ``F.linear`` call by :class:`Linear16`:
the same operands rounded to 16 bits as autocast rounds them, multiplied and accumulated in fp32 by the
fp32 GEMM, the output rounded to 16 bits; the backward pass computes the input, weight and bias gradients
the same way and rounds each to 16 bits before handing it on, as autocast's 16-bit gradients are. The
results are autocast's up to the order of the fp32 additions, the tensors kept for the backward pass are
the same 16-bit ones, and the speed is the fp32 GEMM's plus the conversions.

:func:`wanted` says where it applies: the CPU, a 16-bit autocast dtype, and a CPU on which
:func:`llmspeed.precision.cpu_matmul.crossover` measured the fp32 product to beat the native 16-bit one
(CPUs with native bf16 keep autocast's own kernels). Only ``F.linear`` is replaced (every ``nn.Linear``,
LoRA adapter and fake-quantized QAT layer calls it); attention's products stay autocast's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..precision import cpu_matmul

HALF_DTYPES = cpu_matmul.HALF_DTYPES


def wanted(device_type: str, dtype: torch.dtype) -> bool:
    """Whether autocast to ``dtype`` on ``device_type`` should run its linear layers through :class:`Linear16`."""
    return cpu_matmul.slow_16_bit(device_type, dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:  # [..., n] -> [M, n]
    return t.reshape(-1, t.shape[-1])


class Linear16(torch.autograd.Function):
    """``F.linear`` as 16-bit autocast computes it, with the products in fp32: ``apply(x, weight, bias, dtype)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        xh, wh = x.to(dtype), weight.to(dtype)  # [..., in], [out, in]: autocast's casts
        bh = None if bias is None else bias.to(dtype)  # [out]
        with torch.autocast("cpu", enabled=False):
            out = F.linear(xh.float(), wh.float(), None if bh is None else bh.float())  # [..., out] fp32
        ctx.save_for_backward(xh, wh)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.to(dtype)  # [..., out]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # grad [..., out]
        xh, wh = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dtype = wh.dtype
        g = _rows(grad).float()  # [M, out]
        gx = gw = gb = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                gx = (g @ wh.float()).to(dtype).to(x_dtype).view(xh.shape)  # [..., in]
            if ctx.needs_input_grad[1]:
                gw = (g.t() @ _rows(xh).float()).to(dtype).to(w_dtype)  # [out, in]
            if ctx.needs_input_grad[2]:
                gb = g.sum(0).to(dtype).to(b_dtype)  # [out]
        return gx, gw, gb, None


def _linear_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    names = ("input", "weight", "bias")
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    return values.get("input"), values.get("weight"), values.get("bias")


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not tensor subclasses with their own dispatch


def _eligible(x: Any, weight: Any, bias: Any, dtype: torch.dtype) -> bool:
    ok = (torch.float32, dtype)
    tensors = [t for t in (x, weight, bias) if t is not None]
    return (
        isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
        and all(type(t) in _PLAIN and t.device.type == "cpu" and t.dtype in ok for t in tensors)
    )  # fmt: skip


class FastLinears(TorchFunctionMode):
    """Within this mode, ``F.linear`` calls that CPU autocast would run in 16 bits run through :class:`Linear16`.

    Enter it around the forward pass (inside ``torch.autocast``), and have activation checkpointing enter it
    around its recomputations (``torch.utils.checkpoint``'s ``context_fn``): the backward pass does not carry
    torch function modes. Calls outside a 16-bit CPU autocast, and inputs that are not plain CPU fp32/16-bit
    tensors, run as given.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            x, weight, bias = _linear_args(args, kwargs)
            if dtype in HALF_DTYPES and _eligible(x, weight, bias, dtype):
                return Linear16.apply(x, weight, bias, dtype)
        return func(*args, **kwargs)
