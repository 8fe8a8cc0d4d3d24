"""``cpp``: a fused dequantize-matmul C++ kernel for CPUs, compiled on first use and cached on disk.

The source (``fused_cpu.cpp`` next to this file) decodes int8/int4/NF4 codes in registers with
AVX2/FMA intrinsics (portable loops when the compiler does not target AVX2) and splits output rows over
torch's intra-op threads. It is built with ``torch.utils.cpp_extension.load_inline`` and
``-O3 -march=native`` into ``$LLMSPEED_CACHE/kernels`` (else ``~/.cache/llmspeed/kernels``); the
folder name carries a hash of the source and flags, so later processes load the built library in
milliseconds and a changed source rebuilds. Without a compiler (or with ``LLMSPEED_DISABLE_CPP=1``)
the kernel reports itself unavailable and ``kernel="auto"`` falls back to the pure-torch paths.
Activations are computed in fp32 (bf16/fp16 inputs are converted on the way in and out).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from .registry import FLOAT_DTYPES, Kernel, register_kernel

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17"]
DISABLE_ENV = "LLMSPEED_DISABLE_CPP"
_FUNCTIONS = ["int8_matmul", "int4_matmul", "nf4_matmul", "has_avx2"]


def build_dir() -> Path:
    """Where the compiled kernel lives: ``$LLMSPEED_CACHE/kernels`` or ``~/.cache/llmspeed/kernels``."""
    root = Path(os.environ.get("LLMSPEED_CACHE") or Path.home() / ".cache" / "llmspeed")
    return root / "kernels"


def compiler() -> str | None:
    """Path of the C++ compiler torch would use (``$CXX`` or ``c++``), or ``None``."""
    return shutil.which(os.environ.get("CXX", "c++"))


@lru_cache(maxsize=1)
def _build() -> tuple[ModuleType | None, str | None]:
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None, f"disabled by {DISABLE_ENV}"
    if compiler() is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    if shutil.which("ninja") is None:
        return None, "ninja is not installed (pip install ninja)"
    from torch.utils.cpp_extension import load_inline

    source = SOURCE.read_text()
    digest = hashlib.sha1((source + " ".join(FLAGS) + torch.__version__).encode()).hexdigest()[:12]
    name = f"llmspeed_fused_cpu_{digest}"
    folder = build_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        module = load_inline(
            name=name, cpp_sources=[source], functions=_FUNCTIONS, extra_cflags=FLAGS,
            build_directory=str(folder), verbose=False,
        )  # fmt: skip
    except Exception as err:  # a failed build must leave the pure-torch paths working
        return (
            None,
            f"build failed: {str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__}",
        )
    return module, None


def extension() -> ModuleType | None:
    """The compiled extension (building it on first call), or ``None`` when unavailable."""
    return _build()[0]


def unavailable() -> str | None:
    """Why the C++ kernel cannot run here, or ``None`` (builds it on first call)."""
    return _build()[1]


def _shape(module, x) -> str | None:
    if module.quant_format == "int8":
        return None
    g = module.config.group_size or module.in_padded
    if g % 16:
        return f"the cpp 4-bit kernel needs group_size % 16 == 0; got {g}"
    return None


def _nf4_scales(module) -> torch.Tensor:  # [out, groups] fp32, contiguous
    return module.group_scales().contiguous()


def fused_cpu(module, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
    """Fused dequantize-matmul on the module's own packed buffers (no weight copy)."""
    ext = extension()
    xf = x if x.dtype == torch.float32 else x.float()
    fmt = module.quant_format
    if fmt == "int8":
        y = ext.int8_matmul(xf, module.qweight, module.scales)
    elif fmt == "int4":
        g = module.config.group_size or module.in_padded
        y = ext.int4_matmul(xf, module.qweight, module.scales, module.zeros, g)
    else:
        g = module.config.group_size or module.in_padded
        scales = module.kernel_state("cpp", _nf4_scales) if module.config.double_quant else module.scales
        y = ext.nf4_matmul(xf, module.qweight, scales, g)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def bind_fused_cpu(module):
    """``fn(x) -> y`` with the extension function and the module's tensors looked up once."""
    ext, fmt = extension(), module.quant_format
    if fmt == "int8":
        f, args = ext.int8_matmul, (module.qweight, module.scales)
    elif fmt == "int4":
        f, args = (
            ext.int4_matmul,
            (module.qweight, module.scales, module.zeros, module.config.group_size or module.in_padded),
        )
    else:
        scales = module.kernel_state("cpp", _nf4_scales) if module.config.double_quant else module.scales
        f, args = ext.nf4_matmul, (module.qweight, scales, module.config.group_size or module.in_padded)
    fp32 = torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]: any leading dims
        if x.dtype == fp32:
            return f(x, *args)
        return f(x.float(), *args).to(x.dtype)

    return run


register_kernel(
    Kernel("cpp", ("int8", "int4", "nf4"), ("cpu",), FLOAT_DTYPES, fused_cpu,
           "fused dequant-matmul C++ (AVX2/FMA, built on first use with load_inline)", unavailable, _shape,
           binder=bind_fused_cpu, any_leading_dims=True)
)  # fmt: skip
