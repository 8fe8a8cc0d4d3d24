"""The Triton kernels compile to H100 (sm_90) and A100 (sm_80) machine code, on a machine with no GPU.

The interpreter tests check what the kernels compute, but the interpreter is not the compiler: a type
error in a loop bound, an unsupported ``tl.dot`` shape or a register-hungry tile only shows up when
Triton lowers the kernel for a real GPU. Triton compiles ahead of time for a named target with the
``ptxas`` it ships, so this runs here. Each kernel's launch is recorded from a real call (arguments as
the library passes them), then compiled with those argument types and constants.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from llmspeed.generation import triton_attention
from llmspeed.quant import QuantConfig
from llmspeed.quant.kernels import triton_dequant, triton_gemv, triton_mm
from llmspeed.quant.modules import MODULES

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is part of the test extra (and ships with CUDA builds of torch)", allow_module_level=True)

import triton  # noqa: E402

_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not _PTXAS.exists(), reason="this triton build ships no ptxas")

_TYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
    torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64",
}  # fmt: skip


class _Recorder:
    """Stands in for a compiled kernel: ``kernel[grid](*args, **constexprs)`` records the call."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _signature(fn, args: tuple, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name, value in zip(fn.arg_names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    for name in constexprs:
        sig[name] = "constexpr"
    return sig


def _compile(fn, args: tuple, constexprs: dict, arch: int, num_warps: int = 4) -> int:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=_signature(fn, args, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return len(compiled.asm["cubin"])


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_attention_kernels_compile(monkeypatch, arch, dtype):
    kernels = triton_attention._kernels()
    recorders = type("Recorders", (), {"paged_decode": _Recorder(), "paged_prefill": _Recorder()})
    monkeypatch.setattr(triton_attention, "_kernels", lambda: recorders)
    monkeypatch.setattr(triton_attention, "interpreted", lambda: False)  # compile what a GPU would run
    cache = torch.zeros(8, 16, 8, 64, dtype=dtype)  # [NB, BS, Hkv, D] of the 1B Llama config
    triton_attention.paged_decode(
        torch.zeros(2, 32, 64, dtype=dtype), cache, cache, torch.zeros(2, 4, dtype=torch.long),
        torch.ones(2, dtype=torch.long), 0.125,
    )  # fmt: skip
    plan = triton_attention.prefill_plan([([0, 1], 0, 20, 0), ([2, 3, 4], 16, 30, 20)], 16, torch.device("cpu"))
    query = torch.zeros(50, 32, 64, dtype=dtype)
    triton_attention.paged_prefill(query, cache, cache, plan, 0.125, query.clone())
    for name in ("paged_decode", "paged_prefill"):
        (args, constexprs), = getattr(recorders, name).calls
        assert constexprs["UPCAST"] is False and constexprs["IEEE"] is (dtype == torch.float32)
        assert _compile(getattr(kernels, name), args, constexprs, arch) > 0, name


@pytest.mark.parametrize("fmt, extra", [("int8", {}), ("int4", {"group_size": 64}), ("nf4", {"group_size": 64})])
def test_triton_gemv_compiles_for_every_autotune_config(monkeypatch, fmt, extra):
    recorder, autotuner = _Recorder(), triton_gemv._kernel()
    monkeypatch.setattr(triton_gemv, "_kernel", lambda: recorder)
    module = MODULES[fmt].from_linear(torch.nn.Linear(256, 128, bias=False), QuantConfig(fmt, **extra))
    triton_gemv.triton_gemv(module, torch.zeros(1, 256, dtype=torch.bfloat16))
    (args, constexprs), = recorder.calls
    assert [(c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"], c.num_warps) for c in autotuner.configs] == triton_gemv.configs()
    compiled = set()  # splits of 2, 4 and 8 are the same code with another constant: one of them is compiled
    for config in autotuner.configs:
        code = (config.kwargs["BLOCK_N"], config.kwargs["SPLIT_K"] > 1, config.num_warps)
        if code not in compiled:
            compiled.add(code)
            size = _compile(autotuner.fn, args, {**constexprs, **config.kwargs}, 90, config.num_warps)
            assert size > 0, config


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize(
    "fmt, extra",
    # 4-bit groups: whole groups in a tile (64), a tile inside a group (512), groups straddling tiles (48)
    [("int8", {}), ("int4", {"group_size": 64}), ("nf4", {"group_size": 64}), ("int4", {"group_size": 512}),
     ("int4", {"group_size": 48})],
)  # fmt: skip
def test_triton_dequantize_compiles(monkeypatch, arch, fmt, extra):
    recorder, kernel = _Recorder(), triton_dequant._kernel()
    monkeypatch.setattr(triton_dequant, "_kernel", lambda: recorder)
    module = MODULES[fmt].from_linear(torch.nn.Linear(256, 128, bias=False), QuantConfig(fmt, **extra))
    for dtype in (torch.bfloat16, torch.float32):
        triton_dequant.dequantize(module, dtype)
    for args, constexprs in recorder.calls:
        assert _compile(kernel, args, constexprs, arch) > 0, (fmt, args[4].dtype)


@pytest.mark.parametrize(
    "fmt, extra",
    # 4-bit steps: 64 codes inside a group of 64, 16 codes inside a group of 48
    [("int8", {}), ("int4", {"group_size": 64}), ("nf4", {"group_size": 64}), ("int4", {"group_size": 48})],
)  # fmt: skip
def test_triton_mm_compiles_for_every_autotune_config(monkeypatch, fmt, extra):
    recorder, autotuner = _Recorder(), triton_mm._kernel()
    monkeypatch.setattr(triton_mm, "_kernel", lambda: recorder)
    module = MODULES[fmt].from_linear(torch.nn.Linear(192, 128, bias=False), QuantConfig(fmt, **extra))
    for dtype in (torch.bfloat16, torch.float16):
        triton_mm.triton_mm(module, torch.zeros(40, 192, dtype=dtype))
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in autotuner.configs] == triton_mm.configs()
    (bf16, bf16_constexprs), (fp16, fp16_constexprs) = recorder.calls
    for config in autotuner.configs:  # every tile with bf16 activations; fp16 is the same code with another type
        size = _compile(autotuner.fn, bf16, {**bf16_constexprs, **config.kwargs}, 90, config.num_warps)
        assert size > 0, config
    assert _compile(autotuner.fn, fp16, {**fp16_constexprs, "BLOCK_M": 64, "BLOCK_N": 64}, 90) > 0
    assert _compile(autotuner.fn, bf16, {**bf16_constexprs, "BLOCK_M": 64, "BLOCK_N": 64}, 80) > 0  # an A100 too
