"""Quantized linear modules: packed integer buffers + scales, a ``dequantize()`` oracle, kernel dispatch.

Every module has ``in_features``, ``out_features``, ``quant_format``, ``config`` (a
:class:`~llmspeed.quant.config.QuantConfig`) and ``bias`` (float ``nn.Parameter`` or ``None``), and is
built either from a float ``nn.Linear`` (:meth:`from_linear`, using ``config.method``) or from codes a
calibrated method computed (:meth:`from_codes`). Forward accepts fp32/bf16/fp16 activations, returns the
same dtype, runs the kernel that :mod:`llmspeed.quant.kernels` picks for the format, device, dtype and
number of rows, and is differentiable with respect to its input (the packed buffers never are): the
backward pass multiplies by the dequantized weight, rebuilt on the fly and freed right after.
That shared plumbing is :class:`QuantizedLinearBase` (:mod:`.linear_base`); the formats are here.
"""

from __future__ import annotations

import torch

from . import primitives as P
from .config import QuantConfig
from .hadamard import rotate
from .linear_base import QuantizedLinearBase


def _check_codes(codes: torch.Tensor, dtype: torch.dtype, out: int | None, cols: tuple[int, ...]) -> None:
    if (
        codes.dtype != dtype
        or codes.dim() != 2
        or (out is not None and codes.shape[0] != out)
        or codes.shape[1] not in cols
    ):
        raise ValueError(
            f"codes must be {dtype} of shape [out, {' or '.join(map(str, cols))}]; got {codes.dtype} {tuple(codes.shape)}"
        )


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")


class Int8Linear(QuantizedLinearBase):
    """Weight-only int8, symmetric. Buffers: ``qweight`` int8 [out, in] and ``scales``: fp32 [out] (per output
    channel, the default) or, with ``config.group_size``, fp16 [out, groups] (a scale per group of input
    channels, as GGUF's ``Q8_0``; the last group of a row may be shorter)."""

    quant_format = "int8"

    def __init__(
        self, in_features: int, out_features: int, config: QuantConfig | None = None, bias=None, device=None
    ):
        super().__init__(in_features, out_features, config or QuantConfig("int8"), bias)
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        groups = self.layout.groups
        shape, dtype = ((out_features, groups), P.SCALE_DTYPE) if self.layout.group_scales else ((out_features,), torch.float32)
        self.register_buffer("scales", torch.ones(*shape, dtype=dtype, device=device))

    @classmethod
    def from_codes(cls, codes, scales, zeros=None, *, config, bias=None, in_features=None):
        """``codes`` int8 [out, in], ``scales`` [out] (or [out, groups] with ``config.group_size``, rounded to
        fp16); ``zeros`` must be ``None`` (symmetric)."""
        if zeros is not None:
            raise ValueError("zeros must be None for int8, which is symmetric")
        out, k = codes.shape if codes.dim() == 2 else (0, 0)
        in_features = k if in_features is None else in_features
        _check_codes(codes, torch.int8, None, (in_features,))
        grouped = config.group_size is not None
        _check_shape("scales", scales, (out, config.num_groups(in_features)) if grouped else (out,))
        m = cls(in_features, out, config, bias, device=codes.device)
        m.qweight.copy_(codes)
        m.scales.copy_(scales if grouped else scales.float())
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:  # [r, in]
        return P.dequantize_int8(self.qweight[rows], self.scales[rows], self.config.group_size).to(dtype)


class _Packed4Bit(QuantizedLinearBase):
    """4-bit formats: ``qweight`` uint8 [out, in_pad / 2] (two codes per byte, even element low) + fp16 ``scales``.

    Scales (and int4's zero points) are stored in fp16 (:data:`~llmspeed.quant.primitives.SCALE_DTYPE`);
    :meth:`from_codes` rounds fp32 ones to the nearest fp16, which the quantization methods already chose.
    """

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, bias=None, device=None):
        super().__init__(in_features, out_features, config, bias)
        layout = self.layout
        self.register_buffer("qweight", torch.zeros(out_features, layout.row_bytes, dtype=torch.uint8, device=device))
        self._register_scales(out_features, layout.groups, device)

    def _register_scales(self, out: int, groups: int, device) -> None:
        self.register_buffer("scales", torch.ones(out, groups, dtype=P.SCALE_DTYPE, device=device))

    def codes(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:  # [r, in_pad] uint8
        """The unpacked 4-bit codes of ``rows`` (default: all), padding columns included."""
        return P.unpack_nibbles(self.qweight[rows])

    @classmethod
    def _build(cls, codes, scales, config, bias, in_features):
        out = codes.shape[0] if codes.dim() == 2 else 0
        in_features = codes.shape[1] if in_features is None and codes.dim() == 2 else in_features
        kp = config.padded_in_features(in_features)
        _check_codes(codes, torch.uint8, None, (in_features, kp))
        _check_shape("scales", scales, (out, config.num_groups(in_features)))
        m = cls(in_features, out, config, bias, device=codes.device)
        m.qweight.copy_(P.pack_nibbles(P.pad_columns(codes, kp)))
        return m


class Int4Linear(_Packed4Bit):
    """Weight-only int4, group-wise: ``w = (code - zero) * scale``; adds ``zeros`` fp16 [out, groups].

    With ``config.act_order`` it also holds ``perm`` int64 ``[in]``: packed column ``j`` is input column
    ``perm[j]`` (a GPTQ ``desc_act`` checkpoint), and forward gathers ``x[..., perm]`` first. With
    ``config.hadamard`` the packed weight is the layer's rotated within groups and forward rotates ``x`` first.
    """

    quant_format = "int4"
    zeros: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, config: QuantConfig | None = None, bias=None, device=None
    ):
        super().__init__(in_features, out_features, config or QuantConfig("int4"), bias, device)
        self.register_buffer("zeros", torch.zeros_like(self.scales))
        if self.config.act_order:
            self.register_buffer("perm", torch.arange(in_features, device=device))  # [in] int64

    @classmethod
    def from_codes(cls, codes, scales, zeros=None, *, config, bias=None, in_features=None):
        """``codes`` uint8 [out, in or in_pad] in [0, 15]; ``scales``, ``zeros`` [out, groups] (zeros in the code domain)."""
        if zeros is None:
            raise ValueError("zeros must be given for int4 (asymmetric): [out, groups] in the code domain")
        m = cls._build(codes, scales, config, bias, in_features)
        _check_shape("zeros", zeros, tuple(m.zeros.shape))
        m.scales.copy_(scales)  # rounded to fp16
        m.zeros.copy_(zeros)
        return m

    def packed_dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """``[r, in]``: the weight with its columns in packed order (``perm`` and ``hadamard`` not undone)."""
        w = P.dequantize_int4(self.codes(rows), self.scales[rows].float(), self.zeros[rows].float(), self.config.group_size)
        return w[:, : self.in_features].to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:  # [r, in]
        w = self.packed_dequantize(dtype, rows)  # [r, in] packed column order
        if self._rotated:  # the rotation is its own inverse
            return rotate(w.float(), self.layout.group).to(dtype)
        if not self._permuted:
            return w
        return torch.empty_like(w).index_copy_(1, self.perm, w)  # column perm[j] <- packed column j


class NF4Linear(_Packed4Bit):
    """NF4, group-wise absmax: ``w = NF4_CODEBOOK[code] * scale``.

    Without double quantization ``scales`` is fp16 [out, groups]. With ``config.double_quant`` the scales are
    stored as ``scales_q`` int8 [out, groups],
    ``scales_scale`` fp32 [ceil(out * groups / 256)] and ``scales_offset`` fp32 [1] instead of ``scales``.
    """

    quant_format = "nf4"
    scales_q: torch.Tensor
    scales_scale: torch.Tensor
    scales_offset: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, config: QuantConfig | None = None, bias=None, device=None
    ):
        super().__init__(in_features, out_features, config or QuantConfig("nf4"), bias, device)

    def _register_scales(self, out: int, groups: int, device) -> None:
        if not self.config.double_quant:
            return super()._register_scales(out, groups, device)
        blocks = -(-out * groups // 256)
        self.register_buffer("scales_q", torch.zeros(out, groups, dtype=torch.int8, device=device))
        self.register_buffer("scales_scale", torch.ones(blocks, dtype=torch.float32, device=device))
        self.register_buffer("scales_offset", torch.zeros(1, dtype=torch.float32, device=device))

    @classmethod
    def from_codes(cls, codes, scales, zeros=None, *, config, bias=None, in_features=None):
        """``codes`` uint8 [out, in or in_pad] (codebook indices), ``scales`` fp32 [out, groups] raw absmax.

        With ``config.double_quant`` the scales are double-quantized here; choose codes against
        ``llmspeed.quant.methods.rtn.nf4_effective_scales(scales, config)`` so they stay nearest.
        """
        if zeros is not None:
            raise ValueError("zeros must be None for nf4, which is symmetric (absmax)")
        m = cls._build(codes, scales, config, bias, in_features)
        if config.double_quant:
            q, block, offset = P.double_quantize(scales)
            m.scales_q.copy_(q)
            m.scales_scale.copy_(block)
            m.scales_offset.copy_(offset)
        else:
            m.scales.copy_(scales)  # rounded to fp16
        return m

    def group_scales(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:  # [r, groups] fp32
        """Per-group absmax of ``rows`` (default: all), double-dequantized when needed."""
        if not self.config.double_quant:
            return self.scales[rows].float()
        if isinstance(rows, slice) and rows.indices(self.out_features)[2] == 1:  # a contiguous run of the scales
            first = rows.indices(self.out_features)[0] * self.scales_q.shape[1]  # flat index of the first scale
            return P.double_dequantize(self.scales_q[rows], self.scales_scale, self.scales_offset, first)
        return P.double_dequantize(self.scales_q, self.scales_scale, self.scales_offset)[rows]  # strided or indexed rows

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:  # [r, in]
        w = P.dequantize_nf4(self.codes(rows), self.group_scales(rows), self.config.group_size)
        return w[:, : self.in_features].to(dtype)


MODULES: dict[str, type[QuantizedLinearBase]] = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}


def module_class(fmt: str) -> type[QuantizedLinearBase]:
    """The module class of format ``fmt``."""
    if fmt not in MODULES:
        raise ValueError(f"format must be one of {sorted(MODULES)}; got {fmt!r}")
    return MODULES[fmt]
