"""16-bit linear layers on CPUs without fast 16-bit GEMM: convert the weight to fp32 block by block.

On a CPU without AVX512-BF16 or AMX (this project's 2-core Zen 1 has AVX2 only), PyTorch's bf16 and
fp16 matmuls cost about the same per activation row at every M. Measured here, a bf16 49152x576 layer
takes about 5.5 ms per row, so a 512-token prefill is 6x slower than in fp32. The other way is to convert
the weight to fp32 a block of rows at a time and run the fp32 GEMM. A block is about 4 MB, so it stays in
cache and reuses allocator memory; converting the whole weight at once would cost page faults on a
100 MB buffer. That way costs one conversion pass per call and then runs at fp32 speed. (1 MB blocks made
the GEMMs of long prompts narrow: on a 2-core Zen 3, a 256-row 576x1536 product took 3.9 ms in 1 MB blocks,
3.4 in 4 MB, 2.9 in fp32; a bf16 SmolLM2 prefilled 256 tokens at 539 tok/s, then 595.)

Measured on a 4096x4096 layer, it is 1.5x faster than the native kernel at M=4, 4.5x at M=64 and 5.5x
at M=512. At M=1-2 the native kernel reads half the bytes of fp32 and wins.

:func:`crossover` measures once per process and dtype the smallest M from which
:func:`upcast_linear` wins on this machine. It is ``None`` where the native kernel wins everywhere,
as on CPUs with native bf16. :func:`install` makes ``nn.Linear`` layers pick per call by their M.
:func:`llmspeed.cast` installs it on CPU models unless ``cpu_matmul="native"``.
"""

from __future__ import annotations

import time
import types
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

HALF_DTYPES = (torch.bfloat16, torch.float16)
BLOCK_BYTES = 1 << 22  # fp32 bytes of weight converted per block (as dequant_fp32's)
_PROBE_ROWS = (2, 4, 8, 16, 64)  # the M values crossover() times, on a 1024x1024 layer
_CROSSOVER: dict[torch.dtype, int | None] = {}


def upcast_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    block_bytes: int = BLOCK_BYTES,
) -> torch.Tensor:  # [..., N] in x.dtype
    """``F.linear(x, weight, bias)`` computed in fp32, ``block_bytes`` of converted weight at a time.

    The result is ``F.linear(x.float(), weight.float(), bias.float()).to(x.dtype)`` up to the order of
    fp32 additions. Each output is an fp32 dot product rounded once, as the native 16-bit GEMMs also
    accumulate in fp32. No autograd (the blocks are written with ``out=``).
    """
    n, k = weight.shape
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).float()  # [M, K]
    m = xf.shape[0]
    rows = max(1, block_bytes // (4 * k))
    if m <= 64:  # few rows: [N, M] output, each block's product lands in contiguous rows
        out_t = torch.empty(n, m, dtype=torch.float32)  # [N, M]
        for i in range(0, n, rows):
            torch.mm(weight[i : i + rows].float(), xf.t(), out=out_t[i : i + rows])  # [r, M]
        out = out_t.t()  # [M, N] (strided)
    else:  # many rows: [M, N] output, written one column block at a time
        out = torch.empty(m, n, dtype=torch.float32)  # [M, N]
        for i in range(0, n, rows):
            torch.mm(xf, weight[i : i + rows].float().t(), out=out[:, i : i + rows])  # [M, r]
    if bias is not None:
        out = out + bias.float()  # [M, N]
    return out.to(x.dtype, memory_format=torch.contiguous_format).reshape(*lead, n)  # [..., N]


def _median_ms(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def measure(dtype: torch.dtype, rows: tuple[int, ...] = _PROBE_ROWS, size: int = 1024) -> dict[int, tuple[float, float]]:
    """Milliseconds of the native 16-bit ``F.linear`` and of :func:`upcast_linear`, per M, on a ``size``² layer."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(size, size, generator=gen).to(dtype)  # [size, size]
    times = {}
    for m in rows:
        x = torch.randn(m, size, generator=gen).to(dtype)  # [M, size]
        times[m] = (_median_ms(partial(F.linear, x, weight)), _median_ms(partial(upcast_linear, x, weight)))
    return times


def crossover(dtype: torch.dtype) -> int | None:
    """Smallest M from which :func:`upcast_linear` beats the native kernel here; ``None`` if it never does.

    It is measured once per process and dtype. The timings are :func:`measure` at M = 2, 4, 8, 16 and 64,
    about 0.1 s on this CPU. The answer is the smallest M at which the upcast path wins, at that M and at
    every larger M timed. Both paths give the same result up to rounding, so noise in the timings can
    only cost speed.
    """
    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16; got {dtype}")
    if dtype not in _CROSSOVER:
        with torch.inference_mode():
            times = measure(dtype)
        best = None
        for m in sorted(times, reverse=True):
            native, upcast = times[m]
            if upcast >= native:
                break
            best = m
        _CROSSOVER[dtype] = best
    return _CROSSOVER[dtype]


def uses_upcast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``nn.Linear`` layers with :func:`install` run ``x`` by ``weight`` through :func:`upcast_linear`."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != weight.dtype or x.dtype not in HALF_DTYPES:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    threshold = crossover(x.dtype)
    return threshold is not None and x.numel() // max(1, x.shape[-1]) >= threshold


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if uses_upcast(x, self.weight):
        return upcast_linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def install(root: nn.Module) -> int:
    """Make every ``nn.Linear`` under ``root`` choose per call between native and upcast 16-bit matmul.

    The layers stay ``nn.Linear``: only their ``forward`` is replaced on the instance, and their weights
    and state dicts do not change. Calls other than 16-bit inference on the CPU run plain ``F.linear``:
    fp32, CUDA, mixed dtypes and anything that needs gradients. Returns the number of layers.
    """
    layers = [m for m in root.modules() if type(m) is nn.Linear]
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)  # type: ignore[method-assign]
    return len(layers)


def _is_ours(layer: nn.Module) -> bool:
    method = layer.__dict__.get("forward")
    return isinstance(method, types.MethodType) and method.__func__ is _forward


def remove(root: nn.Module) -> None:
    """Undo :func:`install`: the layers run ``nn.Linear.forward`` again."""
    for layer in root.modules():
        if _is_ours(layer):
            del layer.__dict__["forward"]


def installed(root: nn.Module) -> int:
    """How many layers under ``root`` carry :func:`install`'s forward."""
    return sum(_is_ours(layer) for layer in root.modules())
