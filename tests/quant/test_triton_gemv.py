"""The Triton dequantize-GEMV (a CUDA kernel) checked on the CPU through Triton's interpreter."""

from __future__ import annotations

import textwrap

import pytest
import torch

from llmspeed import triton_env
from llmspeed.quant import QuantConfig
from llmspeed.quant.kernels import KERNELS, triton_gemv
from llmspeed.quant.modules import MODULES

pytest.importorskip("triton", reason="triton is part of the test extra (and ships with CUDA builds of torch)")

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before the kernel is compiled.
_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from llmspeed.quant import QuantConfig
    from llmspeed.quant.kernels import triton_gemv
    from llmspeed.quant.modules import MODULES

    assert triton_gemv.unavailable() is None
    jit = triton_gemv._jit()


    class Fixed:  # the kernel launched with one configuration, as the autotuner launches its pick
        def __init__(self, block_n, split_k):
            self.meta = {"BLOCK_N": block_n, "SPLIT_K": split_k}

        def __getitem__(self, grid):
            return lambda *args, **kwargs: jit[grid](*args, **kwargs, **self.meta)


    g = torch.Generator().manual_seed(0)
    kernel, checked = triton_gemv._kernel, 0
    cases = [("int8", None, {}), ("int4", 32, {}), ("int4", 64, {}), ("nf4", 32, {}),
             ("nf4", 16, {"double_quant": True})]
    for fmt, group, extra in cases:
        for k, n in ((100, 70), (64, 130), (600, 24)):
            lin = torch.nn.Linear(k, n, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=g))
            module = MODULES[fmt].from_linear(lin, QuantConfig(fmt, group_size=group, **extra))
            for m in (1, 3):
                for dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(m, k, generator=g).to(dtype)
                    ref = x.float() @ module.dequantize().T
                    # the autotuned kernel (here its one interpreter configuration, split in 2), and at one fp32 row
                    # fixed ones: unsplit, and splits of 3 and 5 that leave some programs one tile or none
                    for launch in (None, (16, 1), (32, 3), (64, 5)) if (m, dtype) == (1, torch.float32) else (None,):
                        triton_gemv._kernel = (lambda: Fixed(*launch)) if launch else kernel
                        y = triton_gemv.triton_gemv(module, x)
                        assert y.dtype == dtype and y.shape == (m, n), (y.dtype, y.shape)
                        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                        tol = 1e-5 if dtype == torch.float32 else 1e-2
                        assert err < tol, (fmt, group, extra, k, n, m, dtype, launch, err)
                        checked += 1
    print("checked", checked)
    """
)


def test_triton_gemv_matches_the_dequantized_weight_in_the_interpreter(run_script):
    assert "checked 105" in run_script(_SCRIPT)


def test_triton_gemv_is_a_cuda_decode_candidate_only():
    kernel = KERNELS["triton"]
    lin = torch.nn.Linear(64, 32, bias=False)
    module = MODULES["int4"].from_linear(lin, QuantConfig("int4", group_size=32))
    assert "runs on ['cuda'], not cpu" in kernel.why_not(module, torch.randn(1, 64))
    if not torch.cuda.is_available() and not triton_env.interpreted():  # the interpreter makes it available
        assert triton_gemv.unavailable() == "no CUDA device"
    assert "M <= 16" in triton_gemv._shape(module, torch.randn(17, 64))
    odd = MODULES["int4"].from_linear(lin, QuantConfig("int4", group_size=8))
    assert "divisible by 16" in triton_gemv._shape(odd, torch.randn(1, 64))
