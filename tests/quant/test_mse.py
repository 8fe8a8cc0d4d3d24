"""method="mse": data-free int4 with least-squares group ranges (fp16 scales, fractional zero points)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed.quant import Int4Linear, QuantConfig
from llmspeed.quant.methods.hqq import hqq_weight
from llmspeed.quant.methods.mse import mse_int4, mse_weight
from llmspeed.quant.methods.rtn import rtn_weight
from llmspeed.quant.primitives import quantize_activations


def _weight(out: int = 64, inp: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    outliers = torch.rand(out, inp, generator=g) < 0.01
    return torch.where(outliers, w * 8, w)  # heavy tails, like trained weights


def _module(qw, config, in_features):
    return Int4Linear.from_codes(qw.codes, qw.scales, qw.zeros, config=config, in_features=in_features)


def _group_errors(w: torch.Tensor, module: Int4Linear, group_size: int) -> torch.Tensor:  # [out, groups]
    d = module.dequantize() - w  # [out, in]
    d = torch.nn.functional.pad(d, (0, -d.shape[1] % group_size))
    return d.pow(2).reshape(d.shape[0], -1, group_size).sum(-1)


@pytest.mark.parametrize("group_size", [32, 64, 128])  # 128 pads 96 columns up to one group of 128
def test_mse_lowers_rtns_weight_error_and_beats_hqq(group_size):
    w = _weight()
    config = QuantConfig("int4", group_size)
    err = {
        name: (_module(fn(w, config), config, 96).dequantize() - w).pow(2).sum().item()
        for name, fn in (("mse", mse_weight), ("rtn", rtn_weight), ("hqq", hqq_weight))
    }
    assert err["mse"] < 0.85 * err["rtn"], err
    assert err["mse"] < err["hqq"], err


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 6),
    inp=st.integers(1, 40),
    group_size=st.sampled_from([2, 8, 16]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-6, 1e-2, 1.0, 100.0]),
)
def test_mse_never_worse_than_rtn_in_any_group(out, inp, group_size, seed, scale):
    """Round-to-nearest's grid is the first candidate and every candidate is scored as stored."""
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * scale
    config = QuantConfig("int4", group_size)
    mse, rtn = _module(mse_weight(w, config), config, inp), _module(rtn_weight(w, config), config, inp)
    assert torch.isfinite(mse.scales.float()).all() and torch.isfinite(mse.zeros.float()).all()
    e_mse, e_rtn = _group_errors(w, mse, group_size), _group_errors(w, rtn, group_size)
    assert (e_mse <= e_rtn * (1 + 1e-6) + 1e-30).all()


def test_mse_stores_fp16_values_and_codes_nearest_for_them():
    w = _weight()
    config = QuantConfig("int4", 32)
    qw = mse_weight(w, config)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (64, 96) and int(qw.codes.max()) <= 15
    assert qw.scales.shape == qw.zeros.shape == (64, 3)
    assert torch.equal(qw.scales, qw.scales.half().float()) and torch.equal(qw.zeros, qw.zeros.half().float())
    assert not torch.equal(qw.zeros, qw.zeros.round())  # fitted offsets are fractional
    again = torch.round(w.reshape(64, 3, 32) / qw.scales[..., None] + qw.zeros[..., None]).clamp(0, 15)
    assert torch.equal(again.reshape(64, 96).to(torch.uint8), qw.codes)
    module = _module(qw, config, 96)  # the stored module dequantizes to exactly these values
    want = (qw.codes.float().reshape(64, 3, 32) - qw.zeros[..., None]) * qw.scales[..., None]
    torch.testing.assert_close(module.dequantize(), want.reshape(64, 96), rtol=0, atol=0)


def test_constant_and_zero_groups_stay_within_fp16_rounding():
    w = torch.zeros(3, 64)
    w[1] = 0.25
    w[2, :32] = -3.0
    codes, s, z = mse_int4(w, 32)
    d = (codes.float().reshape(3, 2, 32) - z[..., None]) * s[..., None]
    torch.testing.assert_close(d.reshape(3, 64), w, rtol=1e-3, atol=0)  # one fp16 rounding of the scale


def test_padding_columns_do_not_move_the_fit():
    w = _weight(8, 40)
    padded = torch.nn.functional.pad(w, (0, 24))
    _, s, z = mse_int4(padded, 64, valid=torch.arange(64) < 40)
    _, s_far, z_far = mse_int4(torch.nn.functional.pad(w, (0, 24), value=5.0), 64, valid=torch.arange(64) < 40)
    assert torch.equal(s, s_far) and torch.equal(z, z_far)


def test_quantize_with_mse_runs_the_int4_kernels_and_saves(tmp_path):
    model = llmspeed.models.tiny("llama", seed=0)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model.hf(input_ids=x).logits
    rtn = llmspeed.models.tiny("llama", seed=0)
    llmspeed.quantize(rtn, "int4", 32)
    llmspeed.quantize(model, "int4", 32, method="mse")
    layer = dict(model.linear_layers())["model.layers.0.mlp.down_proj"]
    assert isinstance(layer, Int4Linear) and layer.config.method == "mse"
    with torch.no_grad():
        got, got_rtn = model.hf(input_ids=x).logits, rtn.hf(input_ids=x).logits
    assert (got - ref).pow(2).mean() < (got_rtn - ref).pow(2).mean()
    llmspeed.save(model, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(llmspeed.load(tmp_path / "m").hf(input_ids=x).logits, got)


@pytest.mark.parametrize("activations", ["float", "int8"])
@pytest.mark.parametrize("rows", [1, 4, 64, 200])  # kernel="auto" picks per number of rows
def test_every_int4_kernel_honours_fitted_zero_points(rows, activations):
    w = _weight(64, 128)
    config = QuantConfig("int4", 32, method="mse", activations=activations)
    module = _module(mse_weight(w, config), config, 128)
    x = quantize_activations(torch.randn(rows, 128))  # on the int8 grid: int8 activations change nothing
    torch.testing.assert_close(module(x), x @ module.dequantize().T, rtol=1e-3, atol=1e-4)


def _int4_kernels() -> list[str]:
    from llmspeed.quant.kernels import KERNELS

    return sorted(n for n, k in KERNELS.items() if "int4" in k.formats and "cpu" in k.devices)


@pytest.mark.parametrize("kernel", _int4_kernels())
def test_each_int4_kernel_by_name_honours_negative_zero_points(kernel):
    """Groups of positive weights fit an offset above 0: zero points below code 0, which every kernel must take."""
    from llmspeed.quant.kernels import KERNELS

    missing = KERNELS[kernel].unavailable()
    if missing is not None:
        pytest.skip(missing)  # not on this machine (no compiler, no AMX): nothing to check here
    w = _weight(64, 128).abs() + 0.05
    x = quantize_activations(torch.randn(8, 128))  # on the int8 grid: int8 activations change nothing
    ran = []
    for activations in ("float", "int8"):  # each kernel runs with one of them at least
        config = QuantConfig("int4", 32, method="mse", activations=activations)
        module = _module(mse_weight(w, config), config, 128)
        assert module.zeros.float().min() < 0
        if KERNELS[kernel].why_not(module, x) is None:
            got = KERNELS[kernel].run(module, x)
            torch.testing.assert_close(got, x @ module.dequantize().T, rtol=1e-3, atol=1e-4)
            ran.append(activations)
    assert ran, f"kernel {kernel!r} took neither float nor int8 activations"


def test_mse_is_deterministic():
    config = QuantConfig("int4", 32, method="mse")
    a, b = mse_weight(_weight(seed=3), config), mse_weight(_weight(seed=3), config)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_mse_rejects_formats_without_zero_point_before_any_change(fmt):
    model = llmspeed.models.tiny("llama", seed=0)
    before = dict(model.linear_layers())
    with pytest.raises(ValueError, match="method 'mse' supports formats \\['int4'\\].*got format='" + fmt):
        llmspeed.quantize(model, fmt, method="mse")
    assert dict(model.linear_layers()) == before


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(candidates=0), "candidates must be an int >= 1; got 0"),
        (dict(spread=-1.0), r"spread must be in \[0, 15\) steps; got -1.0"),
        (dict(refine=1.5), "refine must be an int >= 0; got 1.5"),
    ],
)
def test_mse_rejects_bad_options_before_any_change(options, match):
    model = llmspeed.models.tiny("llama", seed=0)
    before = {n: m.weight.clone() for n, m in model.linear_layers()}
    with pytest.raises(ValueError, match=match):
        llmspeed.quantize(model, "int4", method="mse", method_options=options)
    assert all(torch.equal(m.weight, before[n]) for n, m in model.linear_layers())


def test_mse_refuses_symmetric_and_compressed_tensors_export(tmp_path):
    model = llmspeed.models.tiny("llama", seed=0)
    with pytest.raises(ValueError, match="symmetric=True is available with method in .*got method='mse'"):
        llmspeed.quantize(model, "int4", method="mse", symmetric=True)
    llmspeed.quantize(model, "int4", method="mse")
    with pytest.raises(ValueError, match="fractional zero points.*method='rtn'"):
        llmspeed.save(model, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
