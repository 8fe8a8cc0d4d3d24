"""Kernels built on torch's own quantized matmuls (aten ops), converted from llmspeed's layouts.

* ``aten_int8``: ``torch._weight_int8pack_mm(x, qweight [N, K] int8, scales [N])`` (CPU and CUDA).
* ``aten_int4_cpu``: ``_convert_weight_to_int4pack_for_cpu`` + ``_weight_int4pack_mm_for_cpu``; it
  computes ``w = (q - 8) * s + z'`` with a float-domain ``z'``, so llmspeed's ``(q - zero) * s`` maps to
  ``z' = (8 - zero) * s``. Holds a converted copy of the packed weight per device (the kernel state).
* ``tinygemm``: CUDA ``_convert_weight_to_int4pack`` + ``_weight_int4pack_mm``, bf16 activations only.
* ``int8_dynamic``: also quantizes activations per row to int8 and runs ``torch._int_mm`` (int32
  accumulation); approximate, so only used when requested by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import FLOAT_DTYPES, Kernel, register_kernel

_INT4_GROUPS = (32, 64, 128, 256)


def _has_op(name: str) -> str | None:
    return None if hasattr(torch.ops.aten, name) else f"this torch build has no aten::{name}"


def _int4_shape(module, x) -> str | None:
    g = module.config.group_size
    if g not in _INT4_GROUPS:
        return f"aten int4 kernels need group_size in {list(_INT4_GROUPS)}; got {g}"
    if module.layout.in_padded % 32 or module.out_features % 16:
        return f"aten int4 kernels need in_pad % 32 == 0 and out % 16 == 0; got {module.layout.in_padded}, {module.out_features}"
    return None


def _pad_x(module, x: torch.Tensor) -> torch.Tensor:  # [M, in_pad]
    pad = module.layout.in_padded - module.in_features
    return F.pad(x, (0, pad)) if pad else x


# --- int8 ---------------------------------------------------------------------------------------
def aten_int8(module, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """``_weight_int8pack_mm``: the int8 weight is read as is (a 64-byte aligned copy, kept with the module's kernel
    state, where the buffer is not aligned: the CPU op crashes on some misaligned weights, e.g. a view into a
    memory-mapped file assigned by the user); scales are cast to the activation dtype."""
    scales = module.scales if x.dtype == torch.float32 else module.scales.to(x.dtype)
    w = module.qweight  # [out, in] int8
    if w.data_ptr() % 64:  # with bf16 activations the op segfaulted on weights 8 or 24 bytes off a 32-byte boundary
        w = module.kernel_state("aten_int8 aligned", lambda m: m.qweight.clone())
    return torch._weight_int8pack_mm(x.contiguous(), w, scales)


def int8_dynamic(module, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """Per-row symmetric int8 activations x int8 weights with ``torch._int_mm``; rescale in fp32."""
    xf = x.float()
    sx = (xf.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)  # [M, 1]
    xq = torch.round(xf / sx).clamp_(-127, 127).to(torch.int8)  # [M, in]
    acc = torch._int_mm(xq, module.qweight.t())  # [M, out] int32
    return (acc.float() * sx * module.scales[None, :]).to(x.dtype)


# --- int4 on CPU --------------------------------------------------------------------------------
def _int4_cpu_state(module) -> tuple[torch.Tensor, dict]:
    codes = module.codes().to(torch.int32)  # [out, in_pad]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # [out, in_pad / 2]
    s, z = module.scales.float(), module.zeros.float()  # [out, groups]
    sz = torch.stack((s.t(), ((8 - z) * s).t()), dim=-1).contiguous()  # [groups, out, 2]
    return packed, {torch.float32: sz}


def aten_int4_cpu(module, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """``_weight_int4pack_mm_for_cpu`` on a converted copy of the packed weight."""
    packed, sz = module.kernel_state("aten_int4_cpu", _int4_cpu_state)
    if x.dtype not in sz:
        sz[x.dtype] = sz[torch.float32].to(x.dtype)
    xp = _pad_x(module, x).contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xp, packed, module.config.group_size, sz[x.dtype])


# --- int4 on CUDA (tinygemm) --------------------------------------------------------------------
def _tinygemm_state(module) -> tuple[torch.Tensor, torch.Tensor]:
    codes = module.codes().to(torch.int32)  # [out, in_pad]
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # tinygemm: even element HIGH
    w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    s, z = module.scales.float(), module.zeros.float()
    sz = torch.stack((s.t(), ((8 - z) * s).t()), dim=-1).to(torch.bfloat16).contiguous()  # [groups, out, 2]
    return w, sz


def tinygemm(module, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out] bf16
    """CUDA ``_weight_int4pack_mm`` (tinygemm), bf16 activations."""
    w, sz = module.kernel_state("tinygemm", _tinygemm_state)
    return torch.ops.aten._weight_int4pack_mm(_pad_x(module, x).contiguous(), w, module.config.group_size, sz)


def _cuda_available() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device"


def _int8_shape(module, x) -> str | None:
    # torch's CPU op with bf16 activations reads past the rows unless K is whole 16-byte steps: wrong values at M = 1
    # (1e33 where the product was 8, K = 17), a segfault at M > 1 (every K % 16 != 0 tried up to 139; fp16, fp32 fine)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and module.in_features % 16:
        return (
            f"aten_int8 with bf16 activations on the CPU needs in_features % 16 == 0 (torch's op reads past the rows "
            f"otherwise); got {module.in_features}"
        )
    return None


def _int_mm_shape(module, x) -> str | None:
    m = x.reshape(-1, x.shape[-1]).shape[0]
    if x.is_cuda and (m <= 16 or module.in_features % 8 or module.out_features % 8):
        return (
            f"torch._int_mm on CUDA needs M > 16 and in/out features % 8 == 0; "
            f"got M={m}, in={module.in_features}, out={module.out_features}"
        )
    return None


def _tinygemm_shape(module, x) -> str | None:
    reason = _int4_shape(module, x)
    if reason is None and module.layout.in_padded % 256:
        return f"tinygemm (innerKTiles=8) needs in_pad % 256 == 0; got {module.layout.in_padded}"
    return reason


register_kernel(
    Kernel("aten_int8", ("int8",), ("cpu", "cuda"), FLOAT_DTYPES, aten_int8,
           "torch._weight_int8pack_mm (weight-only int8)", lambda: _has_op("_weight_int8pack_mm"), _int8_shape)
)  # fmt: skip
register_kernel(
    Kernel("aten_int4_cpu", ("int4",), ("cpu",), FLOAT_DTYPES, aten_int4_cpu,
           "torch._weight_int4pack_mm_for_cpu on a converted weight copy",
           lambda: _has_op("_weight_int4pack_mm_for_cpu"), _int4_shape, auto=False)
)  # fmt: skip
register_kernel(
    Kernel("tinygemm", ("int4",), ("cuda",), (torch.bfloat16,), tinygemm,
           "CUDA torch._weight_int4pack_mm (tinygemm), bf16 activations",
           _cuda_available, _tinygemm_shape)
)  # fmt: skip
register_kernel(
    Kernel("int8_dynamic", ("int8",), ("cpu", "cuda"), FLOAT_DTYPES, int8_dynamic,
           "int8 activations x int8 weights via torch._int_mm (approximate: quantizes activations)",
           lambda: _has_op("_int_mm"), _int_mm_shape, exact=False)
)  # fmt: skip
