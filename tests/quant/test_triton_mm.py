"""The Triton tile matmul (a CUDA kernel) checked on the CPU through Triton's interpreter, and on a GPU."""

from __future__ import annotations

import textwrap

import pytest
import torch

from llmspeed.quant import QuantConfig
from llmspeed.quant.kernels import AUTO_RULES, KERNELS, triton_mm
from llmspeed.quant.modules import MODULES

pytest.importorskip("triton", reason="triton is part of the test extra (and ships with CUDA builds of torch)")

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before the kernel is compiled. fp16 activations (the
# interpreter's bf16 rounds toward zero); the sums run in fp32 in another order than torch's, hence the tolerance.
_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from llmspeed.quant import QuantConfig
    from llmspeed.quant.kernels import triton_mm
    from llmspeed.quant.modules import MODULES

    g = torch.Generator().manual_seed(0)
    checked = 0
    # int8; int4 groups of 16 (a 16-code step), 64, 48 (16-code steps inside each group) and whole rows (64 codes
    # in 64-code steps; 100 and 300 have no 16-code step inside them: refused); NF4 with and without double quantization
    cases = [("int8", None, {}), ("int4", 16, {}), ("int4", 64, {}), ("int4", 48, {}), ("int4", None, {}),
             ("nf4", 32, {}), ("nf4", 64, {"double_quant": True})]
    for fmt, group, extra in cases:
        for k, n in ((100, 70), (64, 130), (300, 33)):  # partial row and column tiles, 4-bit padding past in_features
            lin = torch.nn.Linear(k, n, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=g))
            module = MODULES[fmt].from_linear(lin, QuantConfig(fmt, group_size=group, **extra))
            if triton_mm.tile_k(module) == 0:  # a whole-row group of 100 or 300 codes: no 16-code step inside it
                assert fmt == "int4" and group is None and k % 16, (fmt, group, k)
                continue
            for m in (1, 17, 40):  # one tile of rows, a partial second one
                x = torch.randn(m, k, generator=g).half()
                y = triton_mm.triton_mm(module, x)
                want = x.float() @ module.dequantize(torch.float16).float().T  # [m, n]
                assert y.dtype == torch.float16 and y.shape == (m, n), (y.dtype, y.shape)
                err = ((y.float() - want).abs().max() / want.abs().max()).item()
                assert err < 2e-3, (fmt, group, k, n, m, err)
                checked += 1
    x = torch.randn(2, 3, 100, generator=g).half()  # leading dimensions
    module = MODULES["int4"].from_linear(torch.nn.Linear(100, 70), QuantConfig("int4", group_size=32))
    assert triton_mm.triton_mm(module, x).shape == (2, 3, 70)
    print("checked", checked)
    """
)


def test_triton_mm_matches_the_dequantized_weight_in_the_interpreter(run_script):
    assert "checked 57" in run_script(_SCRIPT)


def test_triton_mm_is_a_timed_cuda_candidate_never_the_guess():
    kernel = KERNELS["triton_mm"]
    module = MODULES["int4"].from_linear(torch.nn.Linear(64, 32, bias=False), QuantConfig("int4", group_size=32))
    assert "runs on ['cuda'], not cpu" in kernel.why_not(module, torch.randn(1, 64, dtype=torch.bfloat16))
    assert kernel.dtypes == (torch.bfloat16, torch.float16)  # fp32 activations: the other kernels
    for fmt in ("int8", "int4", "nf4"):
        names = [name for _, _, name in AUTO_RULES[("cuda", fmt)]]
        assert "triton_mm" in names and names.index("triton_mm") > names.index("triton_dequant")
    assert triton_mm.tile_k(module) == 32
    assert triton_mm.tile_k(MODULES["int4"].from_linear(torch.nn.Linear(96, 8), QuantConfig("int4", group_size=48))) == 16
    odd = MODULES["int4"].from_linear(torch.nn.Linear(64, 8, bias=False), QuantConfig("int4", group_size=8))
    assert "divisible by 16" in triton_mm._shape(odd, torch.randn(1, 64))
    with pytest.raises(ValueError, match="divisible by 16"):
        triton_mm.triton_mm(odd, torch.randn(1, 64, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, group", [("int8", None), ("int4", 64), ("int4", 128), ("nf4", 64)])
@pytest.mark.parametrize("m", [1, 16, 100, 256])
def test_triton_mm_matches_the_dequantized_weight_on_cuda(fmt, group, m):
    torch.manual_seed(0)
    module = MODULES[fmt].from_linear(torch.nn.Linear(576, 1536, bias=False), QuantConfig(fmt, group_size=group)).cuda()
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(m, 576, device="cuda", dtype=dtype)
        want = x.float() @ module.dequantize(dtype).float().T
        err = ((triton_mm.triton_mm(module, x).float() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-2, (dtype, err)
