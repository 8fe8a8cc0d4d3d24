"""The Triton dequantize pass (a CUDA kernel) checked on the CPU through Triton's interpreter, and on a GPU."""

from __future__ import annotations

import textwrap

import pytest
import torch

from llmspeed.quant import QuantConfig
from llmspeed.quant.kernels import KERNELS, auto_kernel, triton_dequant
from llmspeed.quant.modules import MODULES

pytest.importorskip("triton", reason="triton is part of the test extra (and ships with CUDA builds of torch)")

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before the kernel is compiled. The interpreter
# rounds fp32 -> bf16 toward zero (a GPU rounds to nearest even, checked by the gpu test below), so bf16
# is held to one ulp of the fp32 weight here and fp32 / fp16 to bit equality.
_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from llmspeed.quant import QuantConfig
    from llmspeed.quant.kernels import triton_dequant
    from llmspeed.quant.modules import MODULES

    g = torch.Generator().manual_seed(0)
    checked = 0
    # groups of a 256-code tile: 16 to 128 (whole groups in a tile), 512 (a tile inside a group), 48 and
    # whole rows of 112 or 304 codes (groups straddling tiles: a scale per byte)
    cases = [("int8", None, {}), ("int4", 32, {}), ("int4", 64, {}), ("int4", None, {}), ("int4", 512, {}),
             ("int4", 48, {}), ("nf4", 32, {}), ("nf4", 128, {}), ("nf4", 16, {"double_quant": True})]
    tiles = set()
    for fmt, group, extra in cases:
        # 300 inputs: a partial column tile and, for 4-bit, padding columns past in_features
        for k, n in ((100, 70), (64, 130), (300, 33)):
            lin = torch.nn.Linear(k, n, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=g))
            module = MODULES[fmt].from_linear(lin, QuantConfig(fmt, group_size=group, **extra))
            full = module.dequantize(torch.float32)
            tiles.add(triton_dequant.per_group(module.layout.group) if fmt != "int8" else None)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                w = triton_dequant.dequantize(module, dtype)
                assert w.dtype == dtype and w.shape == (n, k), (w.dtype, w.shape)
                if dtype == torch.bfloat16:
                    ulp = (full.abs().clamp_min(1e-30).log2().floor() - 7).exp2()
                    assert ((w.float() - full).abs() <= ulp).all(), (fmt, group, k, n)
                else:
                    assert torch.equal(w, module.dequantize(dtype)), (fmt, group, k, n, dtype)
                checked += 1
    x = torch.randn(5, 100, generator=g)
    module = MODULES["int4"].from_linear(torch.nn.Linear(100, 70), QuantConfig("int4", group_size=32))
    y = triton_dequant.triton_dequant(module, x)
    assert torch.allclose(y, x @ module.dequantize().T, atol=1e-5), "the matmul after the pass"
    assert tiles == {None, 0, 1, 2, 4, 8, 16}, tiles  # every kind of tile above was met
    print("checked", checked)
    """
)


def test_triton_dequantize_matches_the_module_in_the_interpreter(run_script):
    assert "checked 81" in run_script(_SCRIPT)


def test_triton_dequant_is_a_cuda_candidate_at_every_m():
    kernel = KERNELS["triton_dequant"]
    module = MODULES["nf4"].from_linear(torch.nn.Linear(64, 32, bias=False), QuantConfig("nf4", group_size=32))
    assert "runs on ['cuda'], not cpu" in kernel.why_not(module, torch.randn(1, 64))
    assert auto_kernel(module, torch.randn(512, 64)).name != "triton_dequant"  # never on the CPU
    with pytest.raises(ValueError, match="dtype must be one of"):
        triton_dequant.dequantize(module, torch.int8)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, group, extra", [("int8", None, {}), ("int4", 64, {}), ("int4", 128, {}),
                                               ("nf4", 64, {"double_quant": True})])  # fmt: skip
def test_triton_dequantize_is_bit_identical_on_cuda(fmt, group, extra):
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 1536, bias=False)  # SmolLM2's MLP; at group 128, 576 pads to 640
    module = MODULES[fmt].from_linear(lin, QuantConfig(fmt, group_size=group, **extra)).cuda()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(triton_dequant.dequantize(module, dtype), module.dequantize(dtype)), dtype
