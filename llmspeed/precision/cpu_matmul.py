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

Once the linear layers run in fp32 anyway, converting every activation to 16 bits after each layer
and back before the next buys nothing: on SmolLM2-135M in bf16, 256-token prompts spent about as long
converting activations as converting weights, and the norms, attention and MLP products ran in
emulated bf16. So on such CPUs :func:`install` also makes the input embedding hand out fp32
activations in inference: the whole forward pass computes in fp32 over 16-bit weights, as llama.cpp
does with F16 weights. The cast's norms keep fp32 outputs for fp32 inputs, the linear layers return
fp32 for fp32 inputs (:func:`upcast_linear` from the crossover on, else the native kernel over the
input rounded to 16 bits), and the logits come out in fp32. Every call does it, not prompts alone, so
the keys and values a prompt leaves in a transformers cache have the dtype of the decode steps that
read them. Gradients, other devices and CPUs with fast 16-bit GEMM keep 16-bit activations.
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
    # one conversion into a contiguous tensor; for fp32 inputs .to() is a no-op that would keep [N, M]'s strides
    return out.to(x.dtype, memory_format=torch.contiguous_format).contiguous().reshape(*lead, n)  # [..., N]


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


def slow_16_bit(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a 16-bit dtype whose native GEMM on ``device_type`` loses to the fp32 one (a CPU
    with a :func:`crossover`, one without AVX512-BF16 or AMX): where products are better taken in fp32."""
    return device_type == "cpu" and dtype in HALF_DTYPES and crossover(dtype) is not None


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def uses_upcast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``nn.Linear`` layers with :func:`install` run ``x`` by ``weight`` through :func:`upcast_linear`.

    ``x`` is in ``weight``'s 16-bit dtype, or in fp32 (activations in inference, see the module
    docstring); either way on the CPU, with no gradient to record and at least the crossover's rows.
    """
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dtype not in HALF_DTYPES:
        return False
    if x.dtype not in (weight.dtype, torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    threshold = crossover(weight.dtype)
    return threshold is not None and _rows(x) >= threshold


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if torch.is_autocast_enabled(x.device.type):  # autocast picks the dtype, as for any nn.Linear
        return F.linear(x, weight, self.bias)
    if uses_upcast(x, weight):
        return upcast_linear(x, weight, self.bias)
    if x.dtype == torch.float32 and weight.dtype in HALF_DTYPES and not torch.is_grad_enabled():
        return F.linear(x.to(weight.dtype), weight, self.bias).float()  # fp32 activations below the crossover
    return F.linear(x, weight, self.bias)


def upcasts_activations(tokens: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an input embedding with :func:`install` hands out fp32 rows for ``tokens`` (ids) from ``weight``.

    It does on the CPU, in inference (no gradient mode), for a 16-bit ``weight`` whose dtype has a
    :func:`crossover` (the upcast product wins from some M on, so this CPU lacks fast 16-bit GEMM).
    """
    if tokens.device.type != "cpu" or weight.dtype not in HALF_DTYPES or torch.is_grad_enabled():
        return False
    return crossover(weight.dtype) is not None


def _embed(self: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
    out = nn.Embedding.forward(self, tokens)  # [..., E] in the weight's dtype
    return out.float() if upcasts_activations(tokens, self.weight) else out


def install(root: nn.Module) -> int:
    """Make every ``nn.Linear`` under ``root`` choose per call between native and upcast 16-bit matmul.

    The layers stay ``nn.Linear``: only their ``forward`` is replaced on the instance, and their weights
    and state dicts do not change. Calls other than 16-bit inference on the CPU run plain ``F.linear``:
    CUDA, other dtypes, anything that needs gradients and calls under autocast. The input embedding
    (``root``'s ``get_input_embeddings()``, when it is an ``nn.Embedding``) gets a ``forward`` that hands out fp32
    activations in inference (:func:`upcasts_activations`, the module docstring). Returns the number of
    linear layers.
    """
    layers = [m for m in root.modules() if type(m) is nn.Linear]
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)  # type: ignore[method-assign]
    get = getattr(root, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if type(embedding) is nn.Embedding:
        embedding.forward = types.MethodType(_embed, embedding)  # type: ignore[method-assign]
    return len(layers)


def _is_ours(layer: nn.Module, function=_forward) -> bool:
    method = layer.__dict__.get("forward")
    return isinstance(method, types.MethodType) and method.__func__ is function


def remove(root: nn.Module) -> None:
    """Undo :func:`install`: the layers and the input embedding run their class's ``forward`` again."""
    keep_16_bit_activations(root)
    for layer in root.modules():
        if _is_ours(layer):
            del layer.__dict__["forward"]


def installed(root: nn.Module) -> int:
    """How many linear layers under ``root`` carry :func:`install`'s forward."""
    return sum(_is_ours(layer) for layer in root.modules())


def keep_16_bit_activations(root: nn.Module) -> None:
    """Undo the embedding part of :func:`install`: 16-bit activations, each linear still choosing its kernel.

    That is what a cast did before inference moved to fp32 activations; the precision benchmark keeps it
    as a row to compare against.
    """
    for layer in root.modules():
        if _is_ours(layer, _embed):
            del layer.__dict__["forward"]


def embedding_installed(root: nn.Module) -> bool:
    """Whether an embedding under ``root`` carries :func:`install`'s fp32-activation forward."""
    return any(_is_ours(layer, _embed) for layer in root.modules())
