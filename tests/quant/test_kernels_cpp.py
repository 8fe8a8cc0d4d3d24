"""The C++ extension's kernels against the torch reference, over hypothesis shapes: the dequantization pass
``dequant_fp32`` uses, the 4-bit row loop on float activations, and the int8-activation panels ``auto`` picks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import llmspeed
from llmspeed.quant import QuantConfig, module_class
from llmspeed.quant.kernels import KERNELS, amx, auto_kernel, cpp

from .test_kernels import TOLERANCE, _module


@pytest.mark.skipif(cpp.extension() is None, reason="no C++ compiler: dequant_fp32 dequantizes in torch")
@settings(max_examples=40, deadline=None)
@given(
    case=st.sampled_from([("int8", None, False), ("int4", 16, False), ("int4", 64, False), ("int4", 128, False),
                          ("nf4", 32, False), ("nf4", 64, True)]),
    k=st.integers(1, 200),
    n=st.integers(1, 40),
    bounds=st.tuples(st.integers(0, 40), st.integers(0, 45)),
    seed=st.integers(0, 2**16),
)
def test_cpp_dequantize_rows_equals_the_torch_dequantize_bit_for_bit(case, k, n, bounds, seed):
    """The C++ pass dequant_fp32 uses on CPUs: padded widths (k not a multiple of the group), fractional zero
    points (as HQQ's), double-quantized NF4 scales, any row range."""
    fmt, group, double_quant = case
    group = None if group is None or group > k else group
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
    module = module_class(fmt).from_linear(linear, QuantConfig(fmt, group, double_quant=double_quant))
    if fmt == "int4":
        module.zeros.add_(torch.rand(module.zeros.shape, generator=g) - 0.5)  # HQQ moves zero points off the grid
    rows = slice(min(bounds), max(bounds))
    fast = cpp.dequantize_rows(module, rows)
    if fmt != "int8" and not module.layout.tiles_of(cpp.TILE):
        assert fast is None  # per-row groups of a width that is not whole 16-code tiles: torch dequantizes
        return
    assert fast is not None and fast.dtype == torch.float32
    assert torch.equal(fast, module.packed_dequantize(torch.float32, rows))


def _error(out, ref, x, w):
    """``max |out - ref|`` relative to the result's scale: ``max |ref|``, or where the products cancel (hypothesis
    found k=85 int8 products summing to 0.044), their own size ``max(|x| @ |w|^T) / sqrt(k)``: a kernel summing in
    another order than torch differs by the rounding of the terms, not of the result."""
    terms = ((x.abs() @ w.float().abs().T).max() / x.shape[-1] ** 0.5).item()
    return (out - ref).abs().max().item() / max(ref.abs().max().item(), terms, 1e-30)


@pytest.mark.skipif(cpp.extension() is None, reason="no C++ compiler: the cpp kernel is not built")
@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(["int4", "nf4"]),
    group=st.sampled_from([16, 32, 48, 64, 128, None]),
    k=st.integers(1, 300),
    n=st.integers(1, 23),
    m=st.integers(1, 11),
    seed=st.integers(0, 2**16),
)
def test_cpp_4bit_float_activations_match_the_reference(fmt, group, k, n, m, seed):
    """The 4-bit row loop on float activations: groups of whole 32-code blocks (four weight rows at a time on
    AVX-512) and of 16 * odd codes, weight-row counts that leave a tail of one to three, any M (tiles of four x
    rows and the rows left over), fractional zero points."""
    group = None if group is None or group > k else group
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
    module = module_class(fmt).from_linear(linear, QuantConfig(fmt, group))
    if fmt == "int4":
        module.zeros.add_(torch.rand(module.zeros.shape, generator=g) - 0.5)
    x = torch.randn(m, k, generator=g)  # [m, k]
    kernel = KERNELS["cpp"]
    if kernel.why_not(module, x) is not None:
        return
    out, ref = kernel.run(module, x), KERNELS["reference"].run(module, x)
    assert out.shape == ref.shape == (m, n)
    assert _error(out, ref, x, module.dequantize()) <= TOLERANCE[torch.float32]


def _panels_or_skip():
    reason = KERNELS["cpp_panels"].unavailable()
    if reason is not None:
        pytest.skip(reason)  # built for AVX2 and AVX-512 VNNI CPUs (where a compiler exists)


@settings(max_examples=40, deadline=None)
@given(
    group=st.sampled_from([32, 64, 128, 48, None]),
    k=st.integers(1, 300),
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_cpp_panels_matches_the_reference_on_int8_activations(group, k, n, m, seed):
    """int4 x int8 activations on panels (8 rows on AVX2, 16 on VNNI): any width (padded groups), fractional zero points, rows that
    are not whole panels, any M; the input already on its layer's int8 grid, as the module passes it."""
    _panels_or_skip()
    group = None if group is None or group > k else group
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
    module = module_class("int4").from_linear(linear, QuantConfig("int4", group, activations="int8"))
    module.zeros.add_(torch.rand(module.zeros.shape, generator=g) - 0.5)
    x = llmspeed.quant.primitives.quantize_activations(torch.randn(m, k, generator=g))  # [m, k] on the grid
    kernel = KERNELS["cpp_panels"]
    if module.layout.group % 32:
        assert "divisible by 32" in kernel.why_not(module, x)
        return
    assert kernel.why_not(module, x) is None
    out, ref = kernel.run(module, x), KERNELS["reference"].run(module, x)
    assert out.shape == ref.shape == (m, n)
    assert _error(out, ref, x, module.dequantize()) <= TOLERANCE[torch.float32]


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 300), n=st.integers(1, 40), m=st.integers(1, 40), seed=st.integers(0, 2**16))
@example(k=85, n=1, m=1, seed=0)  # products that cancel (see _error)
def test_cpp_panels_int8_weights_match_the_reference_on_int8_activations(k, n, m, seed):
    """int8 weights x int8 activations on 16-row VNNI panels: any width (a partial last block of 4 and of 32
    channels), rows that are not whole panels, any M, weights at both ends of the int8 range."""
    _panels_or_skip()
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
    module = module_class("int8").from_linear(linear, QuantConfig("int8", activations="int8"))
    x = llmspeed.quant.primitives.quantize_activations(torch.randn(m, k, generator=g))  # [m, k] on the grid
    kernel = KERNELS["cpp_panels"]
    reason = kernel.why_not(module, x)
    if not cpp.extension().int8_panels_built():
        assert reason is not None and "VNNI" in reason  # AVX2 builds keep the integer row loop for int8
        return
    assert reason is None
    assert int(module.qweight.min()) == -127 or int(module.qweight.max()) == 127  # a row's largest weight
    out, ref = kernel.run(module, x), KERNELS["reference"].run(module, x)
    assert out.shape == ref.shape == (m, n)
    assert _error(out, ref, x, module.dequantize()) <= TOLERANCE[torch.float32]


def test_cpp_panels_serves_int8_activation_layers_only_and_auto_picks_it_from_9_rows():
    _panels_or_skip()
    float_acts, int8_acts = _module("int4", 64, 128), module_class("int4").from_linear(
        nn.Linear(128, 48, bias=False), QuantConfig("int4", 64, activations="int8")
    )
    x = torch.randn(9, 128)
    assert "activations='float'" in KERNELS["cpp_panels"].why_not(float_acts, x)
    tiles = amx.unavailable() is None
    for m, want in ((8, "cpp"), (9, "cpp_panels"), (512, "cpp_panels")):
        assert auto_kernel(int8_acts, torch.randn(m, 128), probe=False).name == ("amx" if tiles and m > 8 else want)
    x = torch.randn(3, 40, 128)
    with torch.no_grad():  # the module's own forward (rounding, then the kernel auto picks) against the oracle
        got = int8_acts(x)  # [3, 40, 48]
        xq = llmspeed.quant.primitives.quantize_activations(x).reshape(-1, 128)  # [120, 128] on the grid
        want = KERNELS["reference"].run(int8_acts, xq).reshape(3, 40, 48)
    assert ((got - want).abs().max() / want.abs().max()).item() <= TOLERANCE[torch.float32]


def test_auto_takes_int8_panels_from_9_rows_where_they_are_built_and_the_row_loop_and_gemm_elsewhere():
    _panels_or_skip()
    int8_acts = module_class("int8").from_linear(nn.Linear(128, 48, bias=False), QuantConfig("int8", activations="int8"))
    tiles, panels = amx.unavailable() is None, cpp.extension().int8_panels_built()
    for m, without in ((8, "cpp"), (9, "cpp"), (512, "dequant_fp32")):
        want = "cpp" if m <= 8 else "amx" if tiles else "cpp_panels" if panels else without
        assert auto_kernel(int8_acts, torch.randn(m, 128), probe=False).name == want
    x = torch.randn(2, 70, 128)
    with torch.no_grad():  # the module's own forward against the oracle on the rounded input
        got = int8_acts(x)  # [2, 70, 48]
        xq = llmspeed.quant.primitives.quantize_activations(x).reshape(-1, 128)  # [140, 128] on the grid
        want = KERNELS["reference"].run(int8_acts, xq).reshape(2, 70, 48)
    assert ((got - want).abs().max() / want.abs().max()).item() <= TOLERANCE[torch.float32]
