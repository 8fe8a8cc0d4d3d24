"""Fake quantization with straight-through gradients, and ``FakeQuantLinear``, the layer QAT trains.

The forward pass of :func:`fake_quantize` is, operation for operation, the math of
:mod:`llmspeed.quant.primitives` (``quantize_int4`` then ``dequantize_int4``; ``quantize_int8`` then
``dequantize_int8``), so a fake-quantized weight is bit-identical to ``dequantize(quantize(w))``
with the same scales and zero points, and :func:`llmspeed.qat.convert` packs exactly the weight the
model was trained through.

Codes and values have separate quantization parameters: the codes are chosen on the *starting* grid
(``clamp(round(w / s0) + z0)``), the values are ``(codes - z) * s`` with the scales and zero points in
use (learned ones with ``learn_scales``; ``s0``, ``z0`` themselves otherwise). A learned scale or zero
thus moves its whole group smoothly without flipping codes; only the latent weight flips codes.

Backward (one autograd function, so the straight-through gradient is exact, not ``s * (1 / s)``):

* weight: the incoming gradient unchanged where ``round(w / s0) + z0`` lies inside the code range,
  zero where the code was clamped (the clipped straight-through estimator);
* scale: ``sum over the group of grad * (q - z)`` with ``q`` the clamped code held fixed (as PEQA and
  EfficientQAT's end-to-end step-size training). Not LSQ's ``grad * (round(w/s) - w/s)``: that is
  exactly zero when every weight sits on its grid point (a GPTQ start), and Adam turned the noise
  around zero into coherent rescaling that diverged (measured, docs/qat.md);
* zero point: ``-s * sum over the group of grad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import primitives as P
from ..quant.config import QuantConfig
from ..quant.hadamard import rotate, rotation_group

# (lowest code, highest code) of each format's integer grid
CODE_RANGE: dict[str, tuple[int, int]] = {"int4": (0, 15), "int8": (-127, 127)}
# Learnable scales are ``scales * (1 + SCALE_GAIN_RATE * scale_gain)`` with ``scale_gain`` starting at 0:
# Adam moves a parameter by about ``lr`` per step whatever its size, so a raw scale (1e-3..1e-2) would
# change sign within a few dozen steps at lr 1e-4; a gain moves each scale by about 50 * lr relative.
SCALE_GAIN_RATE = 50.0
MIN_GAIN = 0.05  # a scale never shrinks below 5% of its start (never zero, never negative)
# Learnable asymmetric int4 zero points are ``zeros + ZERO_SHIFT_RATE * zero_shift`` (code units; fractional
# zeros are Int4Linear's layout too, as HQQ stores them): about ZERO_SHIFT_RATE * lr codes per Adam step.
ZERO_SHIFT_RATE = 50.0


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:  # [out, groups, group]
    return w.unsqueeze(1) if group_size is None else w.reshape(w.shape[0], -1, group_size)


class _FakeQuantize(torch.autograd.Function):
    """Codes ``clamp(round(w / s0) + z0, lo, hi)`` on the grid, values ``(q - z) * s``; see the module docstring."""

    @staticmethod
    def forward(ctx, w, grid_scales, grid_zeros, scales, zeros, group_size, lo, hi):  # w: [out, in_pad]; the rest: [out, groups]
        g = _grouped(w.float(), group_size)  # [out, groups, group]
        q = (torch.round(g / grid_scales[..., None]) + grid_zeros[..., None]).clamp_(lo, hi)  # as quantize_int4/8
        out = ((q - zeros[..., None]) * scales[..., None]).reshape(w.shape)  # as dequantize_int4 / dequantize_int8
        # backward recomputes the codes from these (no copy of them; F.linear keeps the fake-quantized weight it used)
        ctx.save_for_backward(w, grid_scales, grid_zeros, scales, zeros)
        ctx.group_size, ctx.lo, ctx.hi = group_size, lo, hi
        return out.to(w.dtype)

    @staticmethod
    def backward(ctx, grad):  # grad: [out, in_pad]
        w, grid_scales, grid_zeros, scales, zeros = ctx.saved_tensors
        g = _grouped(w.detach().float(), ctx.group_size)  # [out, groups, group]
        unclamped = torch.round(g / grid_scales[..., None]) + grid_zeros[..., None]
        inside = (unclamped >= ctx.lo) & (unclamped <= ctx.hi)  # [out, groups, group]
        grad_g = grad.float().reshape(g.shape)
        grad_w = torch.where(inside, grad_g, 0.0).reshape(w.shape).to(grad.dtype)
        grad_s = grad_z = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            q = unclamped.clamp_(ctx.lo, ctx.hi)
            if ctx.needs_input_grad[3]:  # d((q - z) * s) / ds with the codes fixed
                grad_s = (grad_g * (q - zeros.detach()[..., None])).sum(dim=2)  # [out, groups]
            if ctx.needs_input_grad[4]:  # d((q - z) * s) / dz = -s
                grad_z = -grad_g.sum(dim=2) * scales.detach()  # [out, groups]
        return grad_w, None, None, grad_s, grad_z, None, None, None


def fake_quantize(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int | None,
    fmt: str,
    grid_scales: torch.Tensor | None = None,
    grid_zeros: torch.Tensor | None = None,
) -> torch.Tensor:  # [out, in_pad], w's dtype
    """Quantize-dequantize padded ``w`` [out, in_pad] on ``fmt``'s grid, differentiable (straight-through).

    ``scales``, ``zeros`` are ``[out, groups]`` (int8: ``[out, 1]`` with zeros 0); ``group_size`` is
    ``None`` for one group per row. The codes are chosen on the grid ``grid_scales``, ``grid_zeros``
    (default: ``scales``, ``zeros`` themselves, which is ``dequantize(quantize(w))``); the values are
    ``(codes - zeros) * scales``, so learned scales and zeros move whole groups without flipping codes.

    Raises:
        ValueError: ``fmt`` is not ``"int4"`` or ``"int8"``, ``group_size`` does not divide ``w``'s columns, or a
            scale or zero tensor is not ``[out, groups]``; the message names the argument.
    """
    if fmt not in CODE_RANGE:
        raise ValueError(f"fmt must be one of {list(CODE_RANGE)}; got {fmt!r}")
    lo, hi = CODE_RANGE[fmt]
    cols = w.shape[-1]
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1 or cols % group_size):  # fmt: skip
        raise ValueError(f"group_size must be None or a positive int dividing w's {cols} columns; got {group_size!r}")
    shape = (w.shape[0], 1 if group_size is None else cols // group_size)  # [out, groups]
    named = {"scales": scales, "zeros": zeros, "grid_scales": grid_scales, "grid_zeros": grid_zeros}
    for name, t in named.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} ([out, groups]) for w {list(w.shape)}; "
                             f"got {list(t.shape)}")
    grid_scales = scales.detach() if grid_scales is None else grid_scales
    grid_zeros = zeros.detach() if grid_zeros is None else grid_zeros
    return _FakeQuantize.apply(w, grid_scales, grid_zeros, scales, zeros, group_size, lo, hi)


def init_qparams(
    w: torch.Tensor, config: QuantConfig, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:  # [out, groups] x2 fp32
    """Scales and zero points of padded ``w`` [out, in_pad] as round-to-nearest chooses them.

    int4 asymmetric uses :func:`~llmspeed.quant.primitives.choose_qparams_int4` (so an unchanged weight
    converts to exactly what ``quantize(model, "int4")`` stores); int4 symmetric uses
    :func:`~llmspeed.quant.primitives.choose_qparams_int4_symmetric` (zero point 8, ``scale = max(-min / 8, max / 7)``:
    ``quantize(model, "int4", symmetric=True)``'s); int8 uses the per-row ``absmax / 127`` of ``Int8Linear``.

    Raises:
        ValueError: ``config.format`` is not ``"int4"`` or ``"int8"`` (NF4 has no integer grid to train on).
    """
    if config.format not in CODE_RANGE:
        raise ValueError(f"config.format must be one of {list(CODE_RANGE)} for fake quantization; got {config.format!r}")
    if config.format == "int8":
        scales = P.choose_qparams_int8(w)[:, None]  # [out, 1]
        return scales, torch.zeros_like(scales)
    choose = P.choose_qparams_int4_symmetric if symmetric else P.choose_qparams_int4  # as the rtn method
    return choose(w, config.group_size)


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward multiplies by its fake-quantized weight (quantization-aware training).

    ``weight`` stays the float latent weight the optimizer updates (fp32 master copy); forward uses
    :meth:`quantized_weight`, the values the converted ``Int4Linear``/``Int8Linear`` will hold. With
    ``config.hadamard`` the latent weight is in the rotated basis (``hadamard.rotate`` of the float weight's
    columns), and forward rotates its input the same way first, as the converted module does.

    Attributes:
        config: The :class:`~llmspeed.quant.config.QuantConfig` :func:`llmspeed.qat.convert` packs with.
        symmetric: Whether the int4 zero point is fixed at code 8 (int8 is always symmetric).
        scales: fp32 ``[out, groups]`` (int8: ``[out, 1]``): the starting scales, a buffer.
        scale_gain: With ``learn_scales``: fp32 parameter ``[out, groups]`` starting at 0; the scales in
            use are :meth:`effective_scales` (equal to ``scales`` bit for bit while the gain is 0).
        zeros: fp32 ``[out, groups]`` integer zero points in the code domain (int8: zeros); a buffer.
        zero_shift: With ``learn_scales`` on asymmetric int4: fp32 parameter ``[out, groups]`` starting
            at 0; the zero points in use are :meth:`effective_zeros` (fractional once it moves).

    The codes always come from the starting grid (``scales``, ``zeros``): ``clamp(round(w / scales) +
    zeros)``; the values are ``(codes - effective_zeros) * effective_scales``. A learned scale or zero
    therefore moves its whole group smoothly and never flips a code; codes flip only when the latent
    weight itself crosses half a grid step.
    """

    fake_format: str  # "int4" or "int8": marks a prepared layer (is_quantized() stays False: it trains)
    scales: torch.Tensor  # buffers (annotated for type checkers)
    zeros: torch.Tensor
    scale_gain: nn.Parameter | None
    zero_shift: nn.Parameter | None

    def __init__(self, linear: nn.Linear, config: QuantConfig, scales, zeros, symmetric: bool, learn_scales: bool):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight  # the same Parameter: its optimizer state and ties carry over
        self.bias = linear.bias
        self.config = config
        self.fake_format = config.format
        self.symmetric = symmetric
        self.register_buffer("scales", scales.detach().float().clone())
        self.register_buffer("zeros", zeros.detach().float().clone())
        self.scale_gain = nn.Parameter(torch.zeros_like(self.scales)) if learn_scales else None
        learn_zeros = learn_scales and config.format == "int4" and not symmetric
        self.zero_shift = nn.Parameter(torch.zeros_like(self.zeros)) if learn_zeros else None

    @property
    def in_padded(self) -> int:
        """Input channels including the zero padding up to a multiple of the group size."""
        return self.config.padded_in_features(self.in_features)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .bfloat16() cast the latent weight, never the fp32 starting grids convert packs
        # with (as the quantized modules keep their scales): only a move to another device reaches them
        grids = {id(self.scales), id(self.zeros)}

        def keep_grids(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in grids:
                return fn(t)
            return t.to(fn(torch.empty(0, dtype=t.dtype, device=t.device)).device)  # fn's device, t's dtype

        return super()._apply(keep_grids, recurse)

    def effective_scales(self) -> torch.Tensor:  # [out, groups] fp32
        """The scales in use: ``scales`` times the learned gain (``scales`` itself when scales do not learn).

        int4 rounds them to the fp16 values ``Int4Linear`` stores (straight through for the gradient).
        """
        if self.scale_gain is None:
            return self.scales
        return self._stored(self.scales * (1 + SCALE_GAIN_RATE * self.scale_gain).clamp_min(MIN_GAIN))

    def effective_zeros(self) -> torch.Tensor:  # [out, groups] fp32
        """The zero points in use: ``zeros`` plus the learned shift (``zeros`` itself when they do not learn),
        on the fp16 grid like :meth:`effective_scales`."""
        if self.zero_shift is None:
            return self.zeros
        return self._stored(self.zeros + ZERO_SHIFT_RATE * self.zero_shift)

    def _stored(self, t: torch.Tensor) -> torch.Tensor:  # t's shape, fp32
        """``t`` as the converted module stores it (int4: fp16), with a straight-through gradient."""
        if self.fake_format != "int4":
            return t
        return t + (P.fp16_grid(t.detach()) - t.detach())

    def codes(self) -> torch.Tensor:  # [out, in_pad] (int4 uint8, int8 int8)
        """The integer codes of the latent weight on the starting grid: what :func:`~llmspeed.qat.convert` packs."""
        w = P.pad_columns(self.weight.detach().float(), self.in_padded)  # [out, in_pad]
        if self.fake_format == "int8":
            return P.quantize_int8(w, self.scales[:, 0])
        return P.quantize_int4(w, self.scales, self.zeros, self.config.group_size)

    def quantized_weight(self) -> torch.Tensor:  # [out, in], the latent weight's dtype (fp32 unless cast), on the grid
        """The weight forward uses: ``(codes - effective_zeros) * effective_scales``, the converted module's."""
        w = P.pad_columns(self.weight, self.in_padded)  # [out, in_pad]
        wq = fake_quantize(
            w, self.effective_scales(), self.effective_zeros(), self.config.group_size, self.fake_format,
            grid_scales=self.scales, grid_zeros=self.zeros,
        )  # fmt: skip
        return wq[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.config.hadamard:
            x = rotate(x, rotation_group(self.config))  # [..., in]: the basis the latent weight is in
        w: torch.Tensor = self.quantized_weight()  # [out, in], the latent weight's dtype
        bias: torch.Tensor | None = self.bias
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            # fp32 activations over a 16-bit model (a cast model's CPU inference, llmspeed.precision.cpu_matmul):
            # compute in x's dtype, as the converted Int4Linear/Int8Linear does (F.linear would refuse the mix)
            w, bias = w.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        g = "" if self.config.group_size is None else f", group_size={self.config.group_size}"
        learn = self.scale_gain is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.fake_format}{g}, "
            f"symmetric={self.symmetric}, learn_scales={learn}, hadamard={self.config.hadamard}, "
            f"bias={self.bias is not None}"
        )
