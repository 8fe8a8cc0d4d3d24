"""``cpp``: a fused dequantize-matmul C++ kernel for CPUs, compiled on first use and cached on disk.

The source (``fused_cpu.cpp`` next to this file) decodes int8/int4/NF4 codes in registers with
AVX2/FMA intrinsics (portable loops when the compiler does not target AVX2) and splits output rows over
torch's intra-op threads. It is built on first use by :func:`llmspeed.cpp_build.build` (``load_inline``,
``-O3 -march=native -fopenmp``, cached on disk under ``$LLMSPEED_CACHE/kernels``). Without a compiler
(or with ``LLMSPEED_DISABLE_CPP=1``) the kernel reports itself unavailable and ``kernel="auto"`` falls
back to the pure-torch paths.
Activations are computed in fp32 (bf16/fp16 inputs are converted on the way in and out); 4-bit scales and zero
points are read as the fp16 the modules store.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ... import cpp_build
from ...protocol import QuantizedLinear
from .registry import FLOAT_DTYPES, Kernel, register_kernel

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
HEADER = Path(__file__).with_name("q4_tiles.h")  # shared with the fused decode step
INT8_HEADER = Path(__file__).with_name("q4_int8.h")  # int8 activations, shared with the fused decode step
PANELS_HEADER = Path(__file__).with_name("q4_panels.h")  # int4 x int8 activations for prompt-sized M (AVX2, VNNI)
Q8_PANELS_HEADER = Path(__file__).with_name("q8_panels.h")  # int8 x int8 activations for prompt-sized M (VNNI)
DEQUANT_HEADER = Path(__file__).with_name("dequant_rows.h")  # packed rows widened to fp32, shared with the fused step
GPTQ_HEADER = Path(__file__).with_name("gptq_columns.h")  # GPTQ's column loop (quant/methods/gptq.py)
INT8_GROUPS_HEADER = Path(__file__).with_name("int8_groups.h")  # group-wise int8, shared with the fused step
DISABLE_ENV = cpp_build.DISABLE_ENV
_FUNCTIONS = ["int8_matmul", "int4_matmul", "nf4_matmul", "has_avx2", "quantize_activations", "dequantize_4bit",
              "dequantize_int8", "int4_matmul_i8", "panel_gemm_built", "int8_matmul_i8", "int8_panels_built",
              "gptq_columns", "int8_group_matmul", "dequantize_int8_groups"]
build_dir = cpp_build.build_dir
compiler = cpp_build.compiler


@lru_cache(maxsize=1)
def _build() -> tuple[ModuleType | None, str | None]:
    return cpp_build.build("llmspeed_fused_cpu", SOURCE, _FUNCTIONS, includes=[HEADER, INT8_HEADER, PANELS_HEADER, Q8_PANELS_HEADER, DEQUANT_HEADER,
                                                                      GPTQ_HEADER, INT8_GROUPS_HEADER])


def extension() -> Any:
    """The compiled extension (building it on first call), or ``None`` when unavailable."""
    return _build()[0]


def unavailable() -> str | None:
    """Why the C++ kernel cannot run here, or ``None`` (builds it on first call)."""
    return _build()[1]


TILE = 16  # 4-bit codes the C++ tile decodes at once: groups must split into whole tiles


def quantize_activations(x: torch.Tensor) -> torch.Tensor | None:  # [..., K] fp32, or None
    """:func:`llmspeed.quant.primitives.quantize_activations` of contiguous fp32 CPU ``x`` in one C++ pass (the
    same values), or ``None`` where it does not apply or the extension is unavailable."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.requires_grad:
        return None
    ext = extension()
    return None if ext is None else ext.quantize_activations(x)


def dequantize_rows(module: QuantizedLinear, rows: slice) -> torch.Tensor | None:  # [r, in] fp32, or None
    """``module.packed_dequantize(torch.float32, rows)`` in one C++ pass over the packed rows (the same values).

    ``None`` where it does not apply (not on the CPU, or a 4-bit group the C++ tile cannot split) or the
    extension is unavailable. Used for the fp32 GEMM of long prompts (``dequant_fp32``)."""
    if module.qweight.device.type != "cpu" or not module.layout.tiles_of(TILE):
        return None
    fmt = module.quant_format
    ext = extension()
    if ext is None:
        return None
    if fmt == "int8" and module.layout.grouped_int8:
        return ext.dequantize_int8_groups(module.qweight[rows], module.scales[rows], module.layout.group)
    if fmt == "int8":
        return ext.dequantize_int8(module.qweight[rows], module.scales[rows])
    zeros = module.zeros[rows] if fmt == "int4" else torch.empty(0)
    w = ext.dequantize_4bit(module.qweight[rows], group_scales_fp16(module)[rows], zeros, module.layout.group)
    return w[:, : module.in_features]  # [r, in]: the padding columns dropped (a view)


def _shape(module: QuantizedLinear, x: torch.Tensor) -> str | None:
    return module.layout.tile_reason(TILE, "the cpp 4-bit kernel")


def group_scales_fp16(module: QuantizedLinear) -> torch.Tensor:  # [out, groups] fp16, contiguous
    """The module's fp16 group scales, as the 4-bit kernels read them (NF4 double quantization undone once, to
    the fp16 values ``group_scales()`` holds, then cached on the module)."""
    if not getattr(module.config, "double_quant", False):
        return module.scales
    return module.kernel_state("group_scales", lambda m: m.group_scales().half().contiguous())


def fused_cpu(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """Fused dequantize-matmul on the module's own packed buffers (no weight copy)."""
    ext = extension()
    xf = x if x.dtype == torch.float32 else x.float()
    fmt = module.quant_format
    if fmt == "int8" and module.layout.grouped_int8:
        y = ext.int8_group_matmul(xf, module.qweight, module.scales, module.layout.group)
    elif fmt == "int8":
        y = ext.int8_matmul(xf, module.qweight, module.scales)
    elif fmt == "int4":
        y = ext.int4_matmul(xf, module.qweight, module.scales, module.zeros, module.layout.group)
    else:
        y = ext.nf4_matmul(xf, module.qweight, group_scales_fp16(module), module.layout.group)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def bind_fused_cpu(module: QuantizedLinear):
    """``fn(x) -> y`` with the extension function and the module's tensors looked up once."""
    ext, fmt = extension(), module.quant_format
    args: tuple[Any, ...]
    if fmt == "int8" and module.layout.grouped_int8:
        f, args = ext.int8_group_matmul, (module.qweight, module.scales, module.layout.group)
    elif fmt == "int8":
        f, args = ext.int8_matmul, (module.qweight, module.scales)
    elif fmt == "int4":
        f, args = (
            ext.int4_matmul,
            (module.qweight, module.scales, module.zeros, module.layout.group),
        )
    else:
        f, args = ext.nf4_matmul, (module.qweight, group_scales_fp16(module), module.layout.group)
    fp32 = torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]: any leading dims
        if x.dtype == fp32:
            return f(x, *args)
        return f(x.float(), *args).to(x.dtype)

    return run


register_kernel(
    Kernel("cpp", ("int8", "int4", "nf4"), ("cpu",), FLOAT_DTYPES, fused_cpu,
           "fused dequant-matmul C++ (AVX2/FMA, built on first use with load_inline)", unavailable, _shape,
           binder=bind_fused_cpu, any_leading_dims=True, int8_groups=True)
)  # fmt: skip


def _panels_unavailable() -> str | None:
    reason = unavailable()
    if reason is None and not extension().panel_gemm_built():
        return "kernel 'cpp_panels' is built for CPUs with AVX2 or AVX-512 VNNI integer dot products"
    return reason


def _panels_shape(module: QuantizedLinear, x: torch.Tensor) -> str | None:
    if getattr(module.config, "activations", "float") != "int8":
        return "kernel 'cpp_panels' multiplies int8 activations; the module has activations='float'"
    if module.quant_format == "int8":
        if not extension().int8_panels_built():
            return "kernel 'cpp_panels' takes int8 weights on AVX-512 VNNI only (AVX2's integer row loop is faster)"
        return None
    return module.layout.tile_reason(32, "kernel 'cpp_panels'")


def panels_cpu(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
    """int4 (``q4_panels.h``) or, on AVX-512 VNNI, int8 (``q8_panels.h``) weights x the int8 codes of ``x``:
    for prompt-sized M, where the weights are repacked into panels of interleaved rows (8 on AVX2, 16 on
    AVX-512 VNNI) and each 4-channel step is one byte multiply-add for the whole panel."""
    xf = x if x.dtype == torch.float32 else x.float()
    if module.quant_format == "int8":
        y = extension().int8_matmul_i8(xf, module.qweight, module.scales)
    else:
        y = extension().int4_matmul_i8(xf, module.qweight, module.scales, module.zeros, module.layout.group)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


register_kernel(
    Kernel("cpp_panels", ("int4", "int8"), ("cpu",), FLOAT_DTYPES, panels_cpu,
           "int4 (AVX2, AVX-512 VNNI) / int8 (VNNI) x int8 activations for prompts, panels of byte multiply-adds",
           _panels_unavailable, _panels_shape, any_leading_dims=True)
)  # fmt: skip
