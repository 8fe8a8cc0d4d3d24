"""The fake quantizer: forward bit-identical to dequantize(quantize(w)), straight-through gradients exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspeed.qat import FakeQuantLinear, fake_quantize, init_qparams
from llmspeed.quant import QuantConfig
from llmspeed.quant import primitives as P


def _weight(out: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(out, cols, generator=torch.Generator().manual_seed(seed)) * 0.05  # [out, cols]


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 9), groups=st.integers(1, 4), group=st.sampled_from([2, 8, 16]), seed=st.integers(0, 999))
def test_int4_forward_is_dequantize_of_quantize_bit_for_bit(out, groups, group, seed):
    w = _weight(out, groups * group, seed)  # [out, in_pad]
    scales, zeros = P.choose_qparams_int4(w, group)
    want = P.dequantize_int4(P.quantize_int4(w, scales, zeros, group), scales, zeros, group)
    assert torch.equal(fake_quantize(w, scales, zeros, group, "int4"), want)
    narrow = scales * 0.6  # some codes clamp: the clamped values must match too
    want = P.dequantize_int4(P.quantize_int4(w, narrow, zeros, group), narrow, zeros, group)
    assert torch.equal(fake_quantize(w, narrow, zeros, group, "int4"), want)


@settings(max_examples=15, deadline=None)
@given(out=st.integers(1, 9), cols=st.integers(1, 40), seed=st.integers(0, 999))
def test_int8_forward_is_dequantize_of_quantize_bit_for_bit(out, cols, seed):
    w = _weight(out, cols, seed)
    scales = P.choose_qparams_int8(w)  # [out]
    want = P.dequantize_int8(P.quantize_int8(w, scales), scales)
    got = fake_quantize(w, scales[:, None], torch.zeros(out, 1), None, "int8")
    assert torch.equal(got, want)


def test_straight_through_gradient_is_the_float_gradient_inside_the_grid_and_zero_outside():
    w = _weight(6, 32, 0).requires_grad_(True)
    scales, zeros = P.choose_qparams_int4(w, 16)
    scales = scales * 0.7  # the extreme values of each group fall outside the grid
    wq = fake_quantize(w, scales, zeros, 16, "int4")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    # the float gradient: of the same loss with the quantized weight as a plain leaf
    leaf = wq.detach().clone().requires_grad_(True)
    ((x @ leaf.T) ** 2).sum().backward()
    ((x @ wq.T) ** 2).sum().backward()
    v = (w.detach().reshape(6, 2, 16) / scales[..., None]).round() + zeros[..., None]
    inside = ((v >= 0) & (v <= 15)).reshape(6, 32)
    assert 0 < int((~inside).sum()) < inside.numel()  # both cases are exercised
    assert torch.equal(w.grad[inside], leaf.grad[inside])
    assert torch.all(w.grad[~inside] == 0)


def test_learned_scale_and_zero_gradients_treat_the_codes_as_fixed():
    w = _weight(4, 16, 2).double()
    grid_s, grid_z = P.choose_qparams_int4(w, 8)  # [4, 2] x2
    scales = (grid_s.double() * 1.1).requires_grad_(True)
    zeros = (grid_z.double() + 0.3).requires_grad_(True)
    g = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = fake_quantize(w, scales, zeros, 8, "int4", grid_scales=grid_s, grid_zeros=grid_z)
    (out * g).sum().backward()
    # reference: the codes of the starting grid as constants, (q - z) * s differentiated by autograd
    q = P.quantize_int4(w, grid_s, grid_z, 8).double().reshape(4, 2, 8)
    s, z = scales.detach().clone().requires_grad_(True), zeros.detach().clone().requires_grad_(True)
    want = ((q - z[..., None]) * s[..., None]).reshape(4, 16)
    torch.testing.assert_close(out.float(), want.float())
    (want * g).sum().backward()
    torch.testing.assert_close(scales.grad, s.grad, rtol=1e-5, atol=1e-6)  # the quantizer computes in fp32
    torch.testing.assert_close(zeros.grad, z.grad, rtol=1e-5, atol=1e-6)


def test_learned_scale_and_zero_gradients_use_the_clamped_codes():
    """The scale gradient is ``sum(grad * (q - z))`` with ``q`` the *clamped* code the forward used, not the
    unclamped ``round(w / s0) + z0``: a grid narrow enough that the extreme weights clamp exercises both."""
    w = _weight(4, 16, 7).double()
    grid_s, grid_z = P.choose_qparams_int4(w, 8)
    grid_s = grid_s * 0.6  # the extreme values of each group fall outside the grid
    unclamped = (w.float().reshape(4, 2, 8) / grid_s[..., None]).round() + grid_z[..., None]
    assert bool(((unclamped < 0) | (unclamped > 15)).any())  # some codes clamp
    scales = grid_s.double().requires_grad_(True)
    zeros = grid_z.double().requires_grad_(True)
    g = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    (fake_quantize(w, scales, zeros, 8, "int4", grid_scales=grid_s, grid_zeros=grid_z) * g).sum().backward()
    q = P.quantize_int4(w, grid_s, grid_z, 8).double().reshape(4, 2, 8)  # the clamped codes
    want_s = (g.reshape(4, 2, 8) * (q - grid_z.double()[..., None])).sum(2)
    torch.testing.assert_close(scales.grad, want_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zeros.grad, -g.reshape(4, 2, 8).sum(2) * grid_s.double(), rtol=1e-5, atol=1e-6)


def test_learned_scales_get_a_gradient_on_an_on_grid_start():
    # regression: LSQ's scale gradient, sum(grad * (round(w/s) - w/s)), is exactly zero when every
    # weight sits on its grid point (a GPTQ start); Adam then amplified noise into coherent rescaling
    w = _weight(4, 16, 5)
    s0, z0 = P.choose_qparams_int4(w, 8)
    on_grid = P.dequantize_int4(P.quantize_int4(w, s0, z0, 8), s0, z0, 8)  # [4, 16]
    scales = s0.clone().requires_grad_(True)
    g = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    (fake_quantize(on_grid, scales, z0, 8, "int4", grid_scales=s0, grid_zeros=z0) * g).sum().backward()
    q = P.quantize_int4(on_grid, s0, z0, 8).float().reshape(4, 2, 8)
    torch.testing.assert_close(scales.grad, (g.reshape(4, 2, 8) * (q - z0[..., None])).sum(2))
    assert scales.grad.abs().min() > 0


def test_learned_scale_and_zero_move_values_without_flipping_codes():
    lin = torch.nn.Linear(16, 4)
    config = QuantConfig("int4", 8)
    scales, zeros = init_qparams(lin.weight.detach(), config, symmetric=False)
    layer = FakeQuantLinear(lin, config, scales, zeros, False, learn_scales=True)
    codes = layer.codes()
    with torch.no_grad():
        layer.scale_gain.fill_(0.004)  # +20% at SCALE_GAIN_RATE 50
        layer.zero_shift.fill_(0.01)  # +0.5 codes at ZERO_SHIFT_RATE 50
    assert torch.equal(layer.codes(), codes)
    s, z = layer.effective_scales(), layer.effective_zeros()
    assert not torch.equal(s, scales) and not torch.equal(z, zeros)
    want = P.dequantize_int4(codes, s, z, 8)
    assert torch.equal(layer.quantized_weight(), want)


def test_int8_learned_scale_moves_values_without_flipping_codes():
    lin = torch.nn.Linear(16, 4)
    config = QuantConfig("int8", None)
    scales, zeros = init_qparams(lin.weight.detach(), config, symmetric=True)
    layer = FakeQuantLinear(lin, config, scales, zeros, True, learn_scales=True)
    codes = layer.codes()
    with torch.no_grad():
        layer.scale_gain.fill_(0.004)  # +20%: codes chosen on the grown scales would differ
    assert torch.equal(layer.codes(), codes)  # still the starting grid's codes
    s = layer.effective_scales()
    assert torch.equal(layer.quantized_weight(), P.dequantize_int8(codes, s[:, 0]))


def test_symmetric_int4_learns_scales_but_keeps_its_zero_point_8():
    """symmetric=True fixes the int4 zero point at code 8: learn_scales must not make it learnable."""
    lin = torch.nn.Linear(16, 4)
    config = QuantConfig("int4", 8)
    scales, zeros = init_qparams(lin.weight.detach(), config, symmetric=True)
    layer = FakeQuantLinear(lin, config, scales, zeros, True, learn_scales=True)
    assert isinstance(layer.scale_gain, torch.nn.Parameter) and layer.zero_shift is None
    assert "zero_shift" not in dict(layer.named_parameters())
    assert torch.all(layer.effective_zeros() == 8)


def test_symmetric_int4_grid_is_zero_point_8():
    w = _weight(3, 16, 4)
    scales, zeros = init_qparams(w, QuantConfig("int4", 16), symmetric=True)
    assert torch.all(zeros == 8)
    exact = torch.maximum(-w.amin(1) / 8, w.amax(1) / 7)  # the grid of quantize(..., symmetric=True)
    s = scales[:, 0]  # rounded up to an fp16 value, as Int4Linear stores it
    assert torch.equal(s, s.half().float()) and bool((s >= exact).all()) and bool((s <= exact * (1 + 2.0**-10)).all())
    want = P.choose_qparams_int4_symmetric(w, 16)
    assert torch.equal(scales, want[0]) and torch.equal(zeros, want[1])


def test_fake_quant_linear_shares_the_weight_and_pads_odd_widths():
    lin = torch.nn.Linear(20, 5, bias=True)
    config = QuantConfig("int4", 8)
    w = P.pad_columns(lin.weight.detach(), config.padded_in_features(20))  # [5, 24]
    scales, zeros = init_qparams(w, config, symmetric=False)
    layer = FakeQuantLinear(lin, config, scales, zeros, False, learn_scales=True)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert isinstance(layer.scale_gain, torch.nn.Parameter) and {"scales", "zeros"} <= dict(layer.named_buffers()).keys()
    assert torch.equal(layer.effective_scales(), layer.scales)  # bit-exact while the gain is 0
    want = P.dequantize_int4(P.quantize_int4(w, scales, zeros, 8), scales, zeros, 8)[:, :20]
    assert torch.equal(layer.quantized_weight(), want)
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, want, lin.bias))


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_gradients_reach_the_latent_weight(fmt):
    lin = torch.nn.Linear(16, 4)
    config = QuantConfig(fmt, 8 if fmt == "int4" else None)
    scales, zeros = init_qparams(lin.weight.detach(), config, symmetric=fmt == "int8")
    layer = FakeQuantLinear(lin, config, scales, zeros, fmt == "int8", learn_scales=False)
    layer(torch.randn(2, 16)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_learned_scales_stay_positive_under_large_steps():
    lin = torch.nn.Linear(16, 4)
    config = QuantConfig("int4", 8)
    scales, zeros = init_qparams(lin.weight.detach(), config, symmetric=False)
    layer = FakeQuantLinear(lin, config, scales, zeros, False, learn_scales=True)
    with torch.no_grad():
        layer.scale_gain.fill_(-1.0)  # far past -1 / SCALE_GAIN_RATE
    assert torch.all(layer.effective_scales() > 0)
    layer(torch.randn(2, 16)).sum().backward()
    assert layer.scale_gain.grad is not None


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_dtype_cast_leaves_the_fp32_grids_alone(fmt):
    """Regression: ``model.hf.to(torch.bfloat16)`` (or ``.half()``) rounded the fp32 starting grids ``scales`` and
    ``zeros`` of every prepared layer to 16 bits, so convert packed other codes and scales than prepare chose;
    the quantized modules already keep their scales' dtype under such casts."""
    from llmspeed import qat

    lin = torch.nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight.copy_(_weight(8, 64, 3))
    config = QuantConfig(fmt, 32 if fmt == "int4" else None)
    scales, zeros = init_qparams(lin.weight.detach(), config, symmetric=fmt == "int8")
    layer = FakeQuantLinear(lin, config, scales, zeros, fmt == "int8", learn_scales=False)
    grids = (layer.scales.clone(), layer.zeros.clone())
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        layer.to(dtype)
        assert layer.weight.dtype == dtype
        assert all(t.dtype == torch.float32 and torch.equal(t, g) for t, g in zip((layer.scales, layer.zeros), grids))
    layer.bfloat16()
    packed = qat.api.convert_layer(layer)  # what convert packs is what forward multiplies by
    assert torch.equal(packed.dequantize(torch.bfloat16), layer.quantized_weight())


@pytest.mark.parametrize("layer", [None, torch.nn.Linear(8, 8), "q_proj"])
def test_convert_layer_names_a_layer_that_is_not_fake_quantized(layer):
    """Regression: a plain nn.Linear (or None) failed with a bare AttributeError ('Linear' has no 'config')."""
    from llmspeed import qat

    with pytest.raises(TypeError, match=f"layer must be a FakeQuantLinear .*; got {type(layer).__name__}"):
        qat.convert_layer(layer)


def test_fake_quantize_names_a_bad_argument():
    """Regression: an unknown fmt was a bare KeyError('nf4'), and a group_size that does not divide the columns or
    per-row int8 scales of shape [out] (not [out, 1]) a RuntimeError about a reshape."""
    w = _weight(4, 16, 9)
    s, z = P.choose_qparams_int4(w, 8)  # [4, 2] x2
    with pytest.raises(ValueError, match="fmt must be one of \\['int4', 'int8'\\]; got 'nf4'"):
        fake_quantize(w, s, z, 8, "nf4")
    for bad in (5, 0, True, 8.0):
        with pytest.raises(ValueError, match=f"group_size must be None or a positive int dividing w's 16 columns; got {bad!r}"):
            fake_quantize(w, s, z, bad, "int4")
    with pytest.raises(ValueError, match=r"scales must have shape \[4, 1\] .*; got \[4\]"):
        fake_quantize(w, P.choose_qparams_int8(w), torch.zeros(4, 1), None, "int8")
    with pytest.raises(ValueError, match=r"zeros must have shape \[4, 2\] .*; got \[4, 1\]"):
        fake_quantize(w, s, z[:, :1], 8, "int4")
    with pytest.raises(ValueError, match=r"grid_scales must have shape \[4, 2\] .*; got \[2, 4\]"):
        fake_quantize(w, s, z, 8, "int4", grid_scales=s.T)


def test_init_qparams_refuses_a_format_without_an_integer_grid():
    """Regression: an ``nf4`` config got int4's min/max scales and zero points without a word (NF4 has no such grid,
    and fake_quantize refuses it)."""
    with pytest.raises(ValueError, match=r"config.format must be one of \['int4', 'int8'\] .*; got 'nf4'"):
        init_qparams(_weight(4, 16, 9), QuantConfig("nf4", 8), symmetric=False)
