"""Every kernel agrees with the reference within a dtype tolerance; ``auto`` choices; the C++ fallback (the C++
kernels over hypothesis shapes: ``test_kernels_cpp.py``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmspeed
from llmspeed.quant import QuantConfig, module_class
from llmspeed.quant.kernels import KERNELS, amx, auto_kernel, cpp, select

# max |kernel - reference| / max |reference| per activation dtype (reference computes in that dtype)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
APPROX_SNR_DB = 25.0  # kernels that also quantize activations (int8_dynamic)
CASES = [("int8", None, 96), ("int4", 32, 100), ("int4", 64, 128), ("int4", 128, 576), ("nf4", 64, 100),
         ("nf4", 32, 64), ("int4", None, 48), ("int8", 32, 96), ("int8", 48, 100), ("int8", 16, 24)]  # fmt: skip


def _module(fmt, group, k, n=48, double_quant=False):
    torch.manual_seed(k + n)
    lin = nn.Linear(k, n, bias=False)
    return module_class(fmt).from_linear(lin, QuantConfig(fmt, group, double_quant=double_quant))


def _kernels_for(fmt):
    return [name for name, k in KERNELS.items() if fmt in k.formats and "cpu" in k.devices]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("fmt, group, k", CASES)
def test_every_cpu_kernel_matches_reference(fmt, group, k, dtype):
    modules = [_module(fmt, group, k)] + ([_module(fmt, group, k, double_quant=True)] if fmt == "nf4" else [])
    checked = 0
    for module in modules:
        for m in (1, 3, 4, 17):
            x = torch.randn(m, k).to(dtype)
            ref = KERNELS["reference"].run(module, x).float()
            for name in _kernels_for(fmt):
                kernel = KERNELS[name]
                if kernel.why_not(module, x) is not None:
                    continue
                out = kernel.run(module, x)
                assert out.dtype == dtype and out.shape == (m, 48), name
                if kernel.exact:
                    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    assert err <= TOLERANCE[dtype], (name, m, err)
                else:
                    snr = 10 * torch.log10(ref.pow(2).sum() / (out.float() - ref).pow(2).sum())
                    assert snr > APPROX_SNR_DB, (name, m, snr)
                checked += 1
    assert checked >= 8  # reference + dequant_fp32 at least, for 4 row counts


def test_cpp_kernel_is_built_and_cached_on_disk():
    if cpp.compiler() is None:
        pytest.skip("no C++ compiler on this machine: the fallback test below covers it")
    assert cpp.unavailable() is None, cpp.unavailable()
    assert list(cpp.build_dir().glob("llmspeed_fused_cpu_*/*.so"))
    module = _module("int4", 64, 128)
    assert auto_kernel(module, torch.randn(1, 128)).name == "cpp"


@pytest.fixture
def no_cpp(monkeypatch):
    """No C++ kernel builds (cpp nor amx) while the test runs."""
    cpp._build.cache_clear(), amx._build.cache_clear()
    monkeypatch.setenv(cpp.DISABLE_ENV, "1")
    yield
    monkeypatch.delenv(cpp.DISABLE_ENV, raising=False)
    cpp._build.cache_clear(), amx._build.cache_clear()


def test_without_compiler_auto_falls_back_to_torch(no_cpp, monkeypatch):
    monkeypatch.delenv(cpp.DISABLE_ENV)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    cpp._build.cache_clear(), amx._build.cache_clear()
    assert "no C++ compiler" in cpp.unavailable() and "no C++ compiler" in amx.unavailable()
    model = llmspeed.models.tiny("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = model.hf(ids).logits
        llmspeed.quantize(model, "nf4", group_size=32)
        out = model.hf(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.25
    layer = model.hf.model.layers[0].mlp.up_proj
    assert auto_kernel(layer, torch.randn(1, 64)).name == "dequant_fp32"
    report = llmspeed.kernels()
    assert not next(r for r in report.kernels if r["kernel"] == "cpp")["available"]


def test_disabled_cpp_named_explicitly_raises(no_cpp):
    assert "disabled" in cpp.unavailable()
    with pytest.raises(ValueError, match="not available on this machine"):
        llmspeed.quantize(llmspeed.models.tiny("llama"), "int8", kernel="cpp")


def test_named_kernel_is_used_and_checked_per_input():
    module = _module("int4", 32, 100)
    object.__setattr__(module, "config", QuantConfig("int4", 32, kernel="aten_int4_cpu"))
    module._kernels.clear()
    assert select(module, torch.randn(2, 100)).name == "aten_int4_cpu"
    module_g16 = _module("int4", 16, 64)
    object.__setattr__(module_g16, "config", QuantConfig("int4", 16, kernel="aten_int4_cpu"))
    with pytest.raises(ValueError, match="group_size in"):
        select(module_g16, torch.randn(2, 64))


def test_report_lists_kernels_and_choices():
    report = llmspeed.kernels()
    names = {r["kernel"] for r in report.kernels}
    assert {
        "reference",
        "dequant_fp32",
        "aten_int8",
        "aten_int4_cpu",
        "cpp",
        "tinygemm",
        "int8_dynamic",
    } <= names
    assert (
        not next(r for r in report.kernels if r["kernel"] == "tinygemm")["available"]
        or torch.cuda.is_available()
    )
    tiles = amx.unavailable() is None
    assert report.choices[("cpu", "int8", "float32", 512)] == ("amx" if tiles else "dequant_fp32")
    assert "amx" in names and next(r for r in report.kernels if r["kernel"] == "amx")["available"] == tiles
    assert "The rule table's guesses" in str(report) and "Timed choices on this machine" in str(report)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, group, k", [("int8", None, 256), ("int4", 64, 512), ("nf4", 64, 256)])
def test_cuda_kernels_match_reference(fmt, group, k):
    module = _module(fmt, group, k, n=64).cuda()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m in (1, 4, 33):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = KERNELS["reference"].run(module, x).float()
            for name in [n for n, kk in KERNELS.items() if fmt in kk.formats and kk.exact]:
                if KERNELS[name].why_not(module, x) is None:
                    out = KERNELS[name].run(module, x).float()
                    assert ((out - ref).abs().max() / ref.abs().max()) <= TOLERANCE[dtype], name


@pytest.mark.gpu
def test_auto_times_kernels_in_cuda_graphs_and_eagerly_when_they_cannot_be_captured():
    from llmspeed.timing import device_ms as _device_ms

    x = torch.randn(1024, 1024, device="cuda")
    graphed = _device_ms(lambda: x @ x)
    uncapturable = _device_ms(lambda: (x @ x).sum().item())  # a host sync cannot be captured
    assert 0 < graphed < 1e3 and 0 < uncapturable < 1e3
    module = _module("int8", None, 512, n=256).cuda()
    xb = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    chosen = auto_kernel(module, xb)
    out = module(xb)  # the module still runs eagerly after the timing captures
    assert chosen.why_not(module, xb) is None and torch.isfinite(out).all()


@pytest.mark.parametrize("fmt, group", [("int8", None), ("int4", 64), ("nf4", 64)])
def test_auto_on_cpu_picks_the_fused_kernel_up_to_128_rows_then_dequantize(fmt, group):
    """The rule table: cpp for M <= 128 (fp32 and bf16 activations), dequantize + MKL above; on a CPU
    with AMX, cpp up to 8 rows and amx above."""
    if cpp.unavailable() is not None:
        pytest.skip(cpp.unavailable())
    module = _module(fmt, group, 128)
    tiles = amx.unavailable() is None
    for dtype in (torch.float32, torch.bfloat16):
        assert auto_kernel(module, torch.randn(1, 128, dtype=dtype)).name == "cpp"
        assert auto_kernel(module, torch.randn(8, 128, dtype=dtype)).name == "cpp"
        assert auto_kernel(module, torch.randn(9, 128, dtype=dtype)).name == ("amx" if tiles else "cpp")
        assert auto_kernel(module, torch.randn(128, 128, dtype=dtype)).name == ("amx" if tiles else "cpp")
        assert auto_kernel(module, torch.randn(129, 128, dtype=dtype)).name == ("amx" if tiles else "dequant_fp32")


def _amx_or_skip():
    if cpp.compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    if amx.unavailable() is not None:
        pytest.skip(f"amx kernel unavailable here (a CPU without AMX-BF16 tiles): {amx.unavailable()}")


_AMX_CASES = [(fmt, group, k, n, shape)
              for fmt, group in [("int8", None), ("int4", 64), ("int4", 32), ("nf4", 128)]
              for k, n, shape in [(100, 37, (70,)), (576, 96, (2, 33)), (64, 32, (32,)), (1536, 64, (5,))]
              if group is None or group <= k]  # fmt: skip


@pytest.mark.parametrize("fmt, group, k, n, shape", _AMX_CASES)
def test_amx_kernel_is_fp32_grade_for_any_shape(fmt, group, k, n, shape):
    """Ragged K (padding to 32, or to the 4-bit group), N and M not multiples of 32, leading dims,
    non-contiguous input: the split hi + lo bf16 products stay within the fp32 tolerance for every
    format; bf16 input takes one product fewer."""
    _amx_or_skip()
    module = _module(fmt, group, k, n=n)
    x = torch.randn(*shape, k * 2)[..., ::2]  # non-contiguous
    ref = x.reshape(-1, k) @ module.dequantize().t()  # [M, n] fp32
    out = KERNELS["amx"].run(module, x)
    assert out.shape == (*shape, n) and out.dtype == torch.float32
    assert ((out.reshape(-1, n) - ref).abs().max() / ref.abs().max()).item() <= TOLERANCE[torch.float32]
    xb = x.to(torch.bfloat16)
    ref_b = xb.float().reshape(-1, k) @ module.dequantize().t()  # exact bf16 inputs, fp32 products
    out_b = KERNELS["amx"].run(module, xb).float().reshape(-1, n)
    assert ((out_b - ref_b).abs().max() / ref_b.abs().max()).item() <= 2 ** -8  # only the output rounding


def test_amx_rejects_4bit_groups_that_are_not_whole_tile_steps():
    _amx_or_skip()
    module = _module("int4", 16, 64)
    assert "divisible by 32" in (KERNELS["amx"].why_not(module, torch.randn(2, 64)) or "")
    assert KERNELS["amx"].why_not(_module("nf4", 64, 128), torch.randn(2, 128)) is None


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_amx_model_forward_matches_cpp(fmt):
    """A whole quantized model through amx (prompt rows) gives the cpp kernel's logits to fp32 noise."""
    _amx_or_skip()
    import copy

    torch.manual_seed(0)
    base = llmspeed.models.tiny("llama")
    ids = torch.randint(0, 200, (2, 40))
    logits = {}
    for kernel in ("amx", "cpp"):
        model = llmspeed.quantize(copy.deepcopy(base), fmt, kernel=kernel)
        with torch.no_grad():
            logits[kernel] = model.hf(ids).logits  # [2, 40, vocab]
    err = (logits["amx"] - logits["cpp"]).abs().max() / logits["cpp"].abs().max()
    assert err.item() <= 1e-4


def test_probe_rejects_kernels_that_fail_or_disagree_with_the_reference():
    """What auto does before trusting an accelerator kernel, checked with stand-in kernels on the CPU."""
    from dataclasses import replace

    from llmspeed.quant.kernels import probe

    module = _module("int4", 64, 128)
    x = torch.randn(3, 128)
    assert probe(KERNELS["reference"], module, x) is None
    assert probe(KERNELS["dequant_fp32"], module, x) is None

    def wrong(module, x):
        return KERNELS["reference"].run(module, x) * 1.5

    def broken(module, x):
        raise ValueError("no kernel image is available for execution on the device")

    def nan(module, x):
        return torch.full((x.shape[0], module.out_features), float("nan"))

    base = KERNELS["reference"]
    assert "relative error 0.5" in probe(replace(base, name="wrong", run=wrong), module, x)
    assert probe(replace(base, name="broken", run=broken), module, x).startswith("ValueError: no kernel image")
    assert "relative error nan" in probe(replace(base, name="nan", run=nan), module, x)


@settings(max_examples=30, deadline=None)
@given(
    case=st.sampled_from([("int8", None, False), ("int8", 32, False), ("int4", 32, False), ("nf4", 32, False), ("nf4", 32, True)]),
    n=st.integers(1, 160),
    bounds=st.tuples(st.integers(0, 160), st.integers(0, 170)),
)
def test_dequantize_rows_is_those_rows_of_the_whole_weight(case, n, bounds):
    fmt, group, double_quant = case
    torch.manual_seed(n)
    # 100 inputs at group 32: 4 groups a row, so double-quant blocks of 256 scales start mid-weight
    module = module_class(fmt).from_linear(nn.Linear(100, n, bias=False), QuantConfig(fmt, group, double_quant=double_quant))
    rows = slice(min(bounds), max(bounds))
    assert torch.equal(module.dequantize(torch.float32, rows), module.dequantize(torch.float32)[rows])


@pytest.mark.parametrize("fmt, group, k", [("int8", None, 96), ("int8", 32, 100), ("int4", 32, 100), ("nf4", 64, 100)])
def test_dequant_fp32_in_row_blocks_matches_reference(fmt, group, k, monkeypatch):
    from llmspeed.quant.kernels import reference

    monkeypatch.setattr(reference, "BLOCK_BYTES", 4 * k * 5)  # 5 rows a block: 9 full blocks and a partial one
    module = _module(fmt, group, k, double_quant=fmt == "nf4")
    kernel = KERNELS["dequant_fp32"]
    for dtype in TOLERANCE:
        for m in (1, 17, 130):
            x = torch.randn(m, k).to(dtype)
            ref = KERNELS["reference"].run(module, x).float()
            out = kernel.run(module, x)
            assert out.dtype == dtype and out.shape == (m, 48)
            assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= TOLERANCE[dtype]
    # inside the autograd function the blocks are written with out=, which grad mode would refuse
    module.config = QuantConfig(fmt, group, kernel="dequant_fp32", double_quant=fmt == "nf4")
    x = torch.randn(130, k, requires_grad=True)
    module(x).sum().backward()
    assert torch.allclose(x.grad, module.dequantize().sum(0).expand(130, k), atol=1e-5)


_MISALIGNED = """
import sys, torch
from llmspeed.quant import QuantConfig, module_class
m = module_class("int8").from_linear(torch.nn.Linear(576, 49152), QuantConfig("int8", kernel="aten_int8"))
x = torch.randn(7, 576).to(torch.bfloat16)
with torch.no_grad():
    ref = m(x)
    for off in (8, 24):
        buf = torch.empty(m.qweight.numel() + 64, dtype=torch.int8)
        start = (-buf.data_ptr()) % 64 + off
        view = buf[start:start + m.qweight.numel()].view_as(m.qweight).copy_(m.qweight)
        m.qweight = view  # what load_state_dict(assign=True) of a memory-mapped file leaves
        assert m.qweight.data_ptr() % 64 == off
        assert torch.equal(m(x), ref), off
print("same")
"""


def test_aten_int8_reads_a_misaligned_weight_without_crashing():
    """Regression: torch._weight_int8pack_mm with bf16 activations segfaulted on an int8 weight 8 or 24 bytes off
    a 32-byte boundary (the whole process died); aten_int8 multiplies an aligned copy instead. In a subprocess, so
    that a crash fails this test rather than the run."""
    done = subprocess.run([sys.executable, "-c", _MISALIGNED], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "same", (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("k", [17, 24, 43, 100])
def test_aten_int8_is_not_used_for_bf16_activations_on_rows_that_are_not_whole_16_byte_steps(k):
    """Regression: torch._weight_int8pack_mm on the CPU with bf16 activations reads past the weight rows when
    in_features % 16 != 0: at M = 1 it returned values like 1e33 for a product of about 8, at M > 1 it segfaulted
    (kernel='auto' times it, so a bf16 int8 layer of such a width could crash the process or be silently wrong). It
    is refused there by name and left out of auto's candidates; fp16, fp32 and whole 16-byte rows keep it."""
    from llmspeed.quant.kernels.auto import cpu_candidates

    module = module_class("int8").from_linear(nn.Linear(k, 32, bias=False), QuantConfig("int8"))
    for m in (1, 5):
        x = torch.randn(m, k).to(torch.bfloat16)
        reason = KERNELS["aten_int8"].why_not(module, x)
        assert reason is not None and "in_features % 16" in reason and str(k) in reason
        assert "aten_int8" not in [c.name for c in cpu_candidates(module, x)]
        assert KERNELS["aten_int8"].why_not(module, x.float()) is None
    object.__setattr__(module, "config", QuantConfig("int8", kernel="aten_int8"))
    with pytest.raises(ValueError, match="in_features % 16 == 0"):
        select(module, torch.randn(2, k).to(torch.bfloat16))
    whole = module_class("int8").from_linear(nn.Linear(48, 32, bias=False), QuantConfig("int8"))
    x = torch.randn(5, 48).to(torch.bfloat16)
    assert KERNELS["aten_int8"].why_not(whole, x) is None
    out, ref = KERNELS["aten_int8"].run(whole, x).float(), KERNELS["reference"].run(whole, x).float()
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("rows, error", [(16, TypeError), ("16", TypeError), ((), ValueError), ((0,), ValueError),
                                         ((-1,), ValueError), ((1.5,), ValueError), ((True,), ValueError)])
def test_report_refuses_bad_rows_by_name(rows, error):
    # Regression: kernels(16) was "'int' object is not iterable", (-1,) a negative-dimension RuntimeError from
    # torch.empty, (0,) and () a report of guesses for no real call size.
    with pytest.raises(error, match=r"^rows must be"):
        llmspeed.kernels(rows)
