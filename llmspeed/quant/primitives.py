"""Pure quantization primitives: choose parameters, quantize, dequantize, pack nibbles, NF4 codebook.

Layouts (the contract every module, kernel, method and file relies on)
---------------------------------------------------------------------
Weights are ``[out, in]`` like ``nn.Linear.weight``. Group-wise formats split each row into groups of
``group_size`` consecutive input channels; ``in`` is first zero-padded on the right up to
``in_pad = ceil(in / group_size) * group_size`` (SmolLM2's 576 becomes 640 at group 128). Padded columns
are never read by the kernels (activations have only ``in`` columns) and ``dequantize`` drops them.

* int8 (per output channel, symmetric): ``codes`` int8 ``[out, in]`` in ``[-127, 127]``,
  ``scales`` fp32 ``[out]``; ``w = codes * scales[:, None]``. Group-wise int8 (a ``group_size``, as GGUF's
  ``Q8_0``): the same codes, never padded, and ``scales`` ``[out, ceil(in / group)]`` stored fp16; column ``k``
  uses ``scales[:, k // group]`` (a row's last group may be shorter).
* int4 (group-wise, asymmetric): ``codes`` uint8 ``[out, in_pad]`` in ``[0, 15]``, ``scales`` and
  ``zeros`` ``[out, in_pad / group]`` (stored fp16: see below); ``w = (codes - zeros) * scales`` per group. The zero point
  lives in the integer (code) domain; round-to-nearest gives whole numbers in ``[0, 15]``, calibrated
  methods (HQQ) may store fractional ones. Symmetric int4 (``QuantConfig.symmetric``) is the same
  layout with every zero equal to 8 and ``scales = max(-min / 8, max / 7)`` per group: codes minus 8 are the signed
  ``[-8, 7]`` values GPTQ (``sym=True``) and compressed-tensors store.
* nf4 (group-wise, absmax): ``codes`` uint8 ``[out, in_pad]`` index :data:`NF4_CODEBOOK`;
  ``scales`` ``[out, groups]`` (stored fp16) are the group absmax; ``w = NF4_CODEBOOK[codes] * scales``.
* 4-bit scales and zero points are stored in fp16 (:data:`SCALE_DTYPE`), as GPTQ, AWQ and compressed-tensors
  checkpoints store them: 4 bytes a group instead of 8 (int4 g32 takes the bytes fp32 scales took at g64). The
  functions here that choose them return fp32 tensors holding fp16 values (:func:`fp16_grid`), so codes are
  chosen against the scales the module will actually hold and every kernel reproduces ``dequantize`` exactly.
* packing: ``pack_nibbles`` stores element ``2j`` in the LOW nibble and ``2j + 1`` in the HIGH nibble of
  byte ``j`` along the last axis: ``packed = codes[..., 0::2] | codes[..., 1::2] << 4``.
* double quantization (nf4): the fp32 scales, flattened row-major, minus their mean ``offset``, are
  quantized symmetric int8 in blocks of 256 with one fp32 scale per block:
  ``scales = q * block_scale[i // 256] + offset``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ACT_BLOCK, DQ_BLOCK

# NormalFloat-4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip
_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2  # [15]
_EPS = 1e-12  # smallest scale: an all-zero row or group still quantizes (to zeros) without dividing by 0
SCALE_DTYPE = torch.float16  # storage of the 4-bit formats' group scales and zero points
_FP16_TINY, _FP16_MAX = 2.0**-24, 65504.0  # smallest positive (subnormal) and largest finite fp16


def fp16_grid(t: torch.Tensor) -> torch.Tensor:  # t's shape, fp32
    """``t`` rounded to the nearest fp16 values (returned as fp32): what a 4-bit module's fp16 buffer stores."""
    return t.to(SCALE_DTYPE).float()


def group_scales_grid(scales: torch.Tensor) -> torch.Tensor:  # scales' shape, fp32
    """4-bit group scales as stored: clamped to the positive finite fp16 range, then rounded *up* to an fp16
    value, so a group's range still fits its codes (no value rounds past the last code: the error stays within
    half a step, as with exact scales)."""
    s = scales.float().clamp(_FP16_TINY, _FP16_MAX)
    h = s.to(SCALE_DTYPE)
    bump = (h.float() < s).to(torch.int16)  # positive fp16: the next larger value is the next bit pattern
    return (h.view(torch.int16) + bump).view(SCALE_DTYPE).float()


def pad_columns(w: torch.Tensor, in_pad: int) -> torch.Tensor:  # [out, in_pad]
    """Zero-pad the last axis of ``w`` [out, in] to ``in_pad`` columns."""
    return F.pad(w, (0, in_pad - w.shape[-1])) if in_pad > w.shape[-1] else w


def _groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:  # [out, groups, group]
    if group_size is None:
        return w.unsqueeze(1)  # [out, 1, in]
    if w.shape[-1] % group_size:
        raise ValueError(f"the padded row length {w.shape[-1]} must be a multiple of group_size={group_size}")
    return w.reshape(w.shape[0], w.shape[-1] // group_size, group_size)  # explicit: also for 0 rows


# --- int8: symmetric, per output channel or group-wise -------------------------------------------
def choose_qparams_int8(w: torch.Tensor, group_size: int | None = None) -> torch.Tensor:  # [out] or [out, groups] fp32
    """Scale ``absmax / 127`` of each row of ``w`` [out, in] (``group_size=None``), or of each group of
    ``group_size`` columns, rounded up to fp16 values (:func:`group_scales_grid`) as the module stores them."""
    w = w.detach().float()
    if group_size is None:
        return (w.abs().amax(dim=1) / 127).clamp_min(_EPS)
    g = _groups(pad_columns(w, -(-w.shape[1] // group_size) * group_size), group_size)  # [out, groups, group]
    return group_scales_grid(g.abs().amax(dim=2) / 127)


def _column_scales(scales: torch.Tensor, columns: int, group_size: int | None) -> torch.Tensor:  # [out, columns] or [out, 1]
    if scales.dim() == 1:
        return scales[:, None]
    if group_size is None:
        raise ValueError(f"group scales {tuple(scales.shape)} need the group_size they were chosen at")
    return scales.float().repeat_interleave(group_size, dim=1)[:, :columns]


def quantize_int8(w: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:  # [out, in] int8
    """Round ``w / scales`` to the nearest integer in [-127, 127] (``scales`` [out], or [out, groups] of ``group_size``)."""
    return torch.round(w.float() / _column_scales(scales, w.shape[1], group_size)).clamp_(-127, 127).to(torch.int8)


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:  # [out, in] fp32
    """``codes * scales`` in fp32, each column by its row's (``scales`` [out]) or its group's (``[out, groups]``) scale."""
    return codes.float() * _column_scales(scales, codes.shape[1], group_size)


# --- int4: group-wise, asymmetric, zero point in the integer domain ------------------------------
def choose_qparams_int4(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points ``[out, groups]`` of padded ``w`` [out, in_pad]; the range always holds 0."""
    g = _groups(w.detach().float(), group_size)  # [out, groups, group]
    lo = g.amin(dim=2).clamp_max(0.0)  # [out, groups]
    hi = g.amax(dim=2).clamp_min(0.0)  # [out, groups]
    scales = group_scales_grid((hi - lo) / 15)
    zeros = torch.round(-lo / scales).clamp_(0, 15)
    return scales, zeros


SYMMETRIC_ZERO = 8.0  # symmetric int4: the code of 0.0, so codes - 8 lie in [-8, 7]


def choose_qparams_int4_symmetric(
    w: torch.Tensor, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4: scales ``max(-min / 8, max / 7)`` and zeros all 8, ``[out, groups]``, of padded ``w`` [out, in_pad].

    The finest step whose signed grid ``[-8, 7]`` holds the whole group: the group's extreme weight (most often the
    one that matters most) lands on a code exactly. GPTQ's reference quantizer takes ``absmax / 7.5``, which leaves
    that weight half a step off whichever its sign; llama.cpp's ``Q4_0`` takes a signed ``max / -8``, which needs
    negative scales (this layout's are positive).
    """
    g = _groups(w.detach().float(), group_size)  # [out, groups, group]
    lo = g.amin(dim=2).clamp_max(0.0)  # [out, groups]
    hi = g.amax(dim=2).clamp_min(0.0)  # [out, groups]
    scales = group_scales_grid(torch.maximum(-lo / 8, hi / 7))  # rounded up: the range still fits the codes
    return scales, torch.full_like(scales, SYMMETRIC_ZERO)


def choose_qparams_int4_symmetric_absmax(
    w: torch.Tensor, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 as GPTQ's reference quantizer chooses it: scales ``absmax / 7.5``, zeros all 8.

    Half a step of room past the group's range on the negative side, which GPTQ's error feedback (columns of a
    group updated after its scale is fixed) pushes into: GPTQ takes this rule (:mod:`.methods.gptq`).
    """
    absmax = _groups(w.detach().float(), group_size).abs().amax(dim=2)  # [out, groups]
    scales = group_scales_grid(absmax / 7.5)
    return scales, torch.full_like(scales, SYMMETRIC_ZERO)


def quantize_int4(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None
) -> torch.Tensor:  # [out, in_pad] uint8
    """Codes ``clamp(round(w / scale) + zero, 0, 15)`` per group of padded ``w`` [out, in_pad]."""
    g = _groups(w.float(), group_size)  # [out, groups, group]
    q = torch.round(g / scales[..., None]) + zeros[..., None]
    return q.clamp_(0, 15).to(torch.uint8).reshape(w.shape)


def dequantize_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None
) -> torch.Tensor:  # [out, in_pad] fp32
    """``(codes - zeros) * scales`` per group, fp32."""
    g = _groups(codes.float(), group_size)  # [out, groups, group]
    return ((g - zeros[..., None]) * scales[..., None]).reshape(codes.shape)


# --- nf4: group-wise absmax over the NormalFloat codebook ---------------------------------------
def choose_qparams_nf4(w: torch.Tensor, group_size: int | None) -> torch.Tensor:  # [out, groups] fp32
    """Group absmax of padded ``w`` [out, in_pad] (on the fp16 grid: :func:`group_scales_grid`)."""
    return group_scales_grid(_groups(w.detach().float(), group_size).abs().amax(dim=2))


def quantize_nf4(w: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Index of the nearest NF4 code to ``w / scale`` per element: uint8 ``[out, in_pad]``."""
    g = _groups(w.float(), group_size) / scales[..., None]  # [out, groups, group]
    idx = torch.bucketize(g, _NF4_MIDPOINTS.to(g.device))
    return idx.to(torch.uint8).reshape(w.shape)


_CODEBOOKS: dict[torch.device, torch.Tensor] = {}


def _codebook(device: torch.device) -> torch.Tensor:  # [16] fp32 on device, copied once per device
    if device.type == "cpu":
        return NF4_CODEBOOK
    if device not in _CODEBOOKS:
        _CODEBOOKS[device] = NF4_CODEBOOK.to(device)
    return _CODEBOOKS[device]


def dequantize_nf4(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``NF4_CODEBOOK[codes] * scales`` per group, fp32 ``[out, in_pad]``."""
    values = _codebook(codes.device)[codes.long()]  # [out, in_pad]
    return (_groups(values, group_size) * scales[..., None]).reshape(codes.shape)


# --- double quantization of scales (nf4) -------------------------------------------------------
def double_quantize(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize fp32 ``scales`` (any shape) to ``(q int8 [same shape], block_scale fp32 [blocks], offset fp32 [1])``."""
    flat = scales.detach().float().reshape(-1)  # [n]
    offset = flat.mean().reshape(1)  # [1]
    centred = flat - offset
    n_blocks = -(-flat.numel() // DQ_BLOCK)
    padded = F.pad(centred, (0, n_blocks * DQ_BLOCK - flat.numel())).view(n_blocks, DQ_BLOCK)
    block_scale = (padded.abs().amax(dim=1) / 127).clamp_min(_EPS)  # [blocks]
    q = torch.round(padded / block_scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[: flat.numel()].reshape(scales.shape), block_scale, offset


def double_dequantize(q: torch.Tensor, block_scale: torch.Tensor, offset: torch.Tensor, first: int = 0) -> torch.Tensor:
    """The scales (shape of ``q``, fp32 holding fp16 values) from :func:`double_quantize` output.

    Rounded to fp16 like stored 4-bit scales, so the kernels' fp16 copy of them is exact. ``q`` may be a
    contiguous run of the quantized scales whose first element has flat index ``first``
    (a block of rows), so that each scale meets its own block's ``block_scale``.
    """
    flat = q.reshape(-1).float()  # [n]
    block = torch.arange(first, first + flat.numel(), device=q.device) // DQ_BLOCK
    return fp16_grid(flat * block_scale[block] + offset).reshape(q.shape)


# --- nibble packing ----------------------------------------------------------------------------
def quantize_activations(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:  # [..., K], x's dtype
    """Dynamic int8 activations (``QuantConfig(activations="int8")``), returned dequantized.

    Each block of ``block`` consecutive channels of each row (the last one zero-padded) gets
    ``d = absmax / 127`` and becomes ``round(x / d) * d`` (half to even; 0 where ``d == 0``): the values
    a kernel multiplying int8 codes ``round(x / d)`` by the weight's codes and rescaling by ``d`` sees.
    """
    k, pad = x.shape[-1], -x.shape[-1] % block
    xf = (F.pad(x, (0, pad)) if pad else x).float().unflatten(-1, (-1, block))  # [..., K / block, block]
    d = xf.abs().amax(-1, keepdim=True).div_(127)  # [..., K / block, 1]
    y = xf.div(d.masked_fill(d == 0, 1.0)).round_().mul_(d).flatten(-2)  # codes in [-127, 127], times d
    return (y[..., :k] if pad else y).to(x.dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:  # [..., n / 2] uint8
    """Pack 4-bit codes (uint8 in [0, 15], even last axis): element 2j low nibble, 2j+1 high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"codes must have an even last axis to pack two per byte; got {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes must lie in [0, 15] to pack as nibbles; got max {int(codes.max())}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:  # [..., 2n] uint8
    """Inverse of :func:`pack_nibbles`."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
