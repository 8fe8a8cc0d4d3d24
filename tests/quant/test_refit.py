"""Least-squares scales after GPTQ / AWQ (``refit_scales``): never a larger layer error, same codes, same files."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed.quant import QuantConfig
from llmspeed.quant import hessian as H
from llmspeed.quant.methods import gptq as G
from llmspeed.quant.methods.refit import grid_values, refit_scales

OPTS = dict(seq_len=32, n_sequences=16, progress=False)


def _problem(out: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_f, generator=g)  # [out, in]
    x = torch.randn(4 * in_f, in_f, generator=g) * torch.linspace(0.2, 3.0, in_f)  # [N, in], uneven channels
    x = x + 0.5 * x.roll(1, dims=1)  # correlated neighbours: off-diagonal Hessian terms
    h = torch.zeros(in_f, in_f)
    return w, H.finalize_hessian(h, H.accumulate_hessian(h, x))


def _error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # [out]
    d = q - w
    return ((d @ h) * d).sum(1)


@settings(max_examples=20, deadline=None)
@given(
    out=st.integers(1, 12),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([8, 16]),
    ragged=st.booleans(),
    fmt=st.sampled_from(["int4", "nf4", "int8"]),
    seed=st.integers(0, 2**16),
    chunk=st.sampled_from([1, 5, 128]),
)
def test_refit_never_raises_a_rows_error_and_keeps_the_codes(out, groups, group_size, ragged, fmt, seed, chunk):
    in_f = groups * group_size - (group_size // 2 if ragged else 0)  # ragged: the last group is padded
    gs = None if fmt == "int8" else group_size
    w, h = _problem(out, in_f, seed)
    res = G.gptq_quantize(w, h, G.grid_for(fmt), gs, act_order=True, block_size=8)
    scales, deq, changed = refit_scales(w, h, fmt, res.scales, res.zeros, res.dequantized, gs, rows_per_chunk=chunk)
    before, after = _error(w, res.dequantized, h), _error(w, deq, h)
    assert (after <= before * (1 + 1e-5) + 1e-6).all()
    assert torch.equal(scales[~changed], res.scales[~changed])
    # Same grid values, new scales: the packed module holds the same codes and zero points.
    config = QuantConfig(fmt, gs, method="gptq")
    old = G.pack_result(res, config, bias=None)
    new = G.pack_result(G.GPTQResult(scales, res.zeros, deq), config, bias=None)
    assert torch.equal(old.qweight, new.qweight)
    if fmt == "int4":
        assert torch.equal(old.zeros, new.zeros)
    torch.testing.assert_close(new.dequantize(), deq, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_refit_lowers_the_layer_error_gptq_left(fmt):
    w, h = _problem(48, 64, seed=3)
    gs = None if fmt == "int8" else 16
    res = G.gptq_quantize(w, h, G.grid_for(fmt), gs, act_order=True)
    _, deq, changed = refit_scales(w, h, fmt, res.scales, res.zeros, res.dequantized, gs)
    assert changed.float().mean() > 0.5
    assert _error(w, deq, h).sum() < 0.995 * _error(w, res.dequantized, h).sum()


def test_refit_is_exact_on_a_diagonal_hessian_with_one_group():
    """One group, H = I: the least-squares scale is <p, w> / <p, p> in closed form."""
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    res = G.gptq_quantize(w, torch.eye(16), G.grid_for("int4"), 16)
    scales, _, _ = refit_scales(w, torch.eye(16), "int4", res.scales, res.zeros, res.dequantized, 16)
    p = grid_values("int4", res.scales, res.zeros, res.dequantized.view(5, 1, 16))[:, 0]  # [5, 16]
    exact = (p * w).sum(1) / (p * p).sum(1)
    assert torch.equal(scales[:, 0], exact.half().float())  # int4 scales are stored in fp16: the nearest one


def test_grid_values_are_the_codes_minus_the_zeros():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    s, z = G.grid_for("int4").fit(w.view(6, 2, 16).reshape(12, 16))
    s, z = s.view(6, 2), z.view(6, 2)
    codes = llmspeed.quant.primitives.quantize_int4(w, s, z, 16)  # [6, 32]
    deq = llmspeed.quant.primitives.dequantize_int4(codes, s, z, 16)
    p = grid_values("int4", s, z, deq.view(6, 2, 16)).reshape(6, 32)
    assert torch.equal(p, codes.float() - z.repeat_interleave(16, dim=1))


def test_refit_rejects_scales_of_another_shape():
    w, h = _problem(4, 32, seed=0)
    res = G.gptq_quantize(w, h, G.grid_for("int4"), 16)
    with pytest.raises(ValueError, match="do not match weight"):
        refit_scales(w, h, "int4", res.scales[:, :1], res.zeros[:, :1], res.dequantized, 16)
    with pytest.raises(ValueError, match="fmt must be"):
        refit_scales(w, h, "fp8", res.scales, res.zeros, res.dequantized, 16)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq", "awq"])
def test_the_refit_is_on_by_default_and_can_be_turned_off(method):
    tokens = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))  # [n, t]
    layers = {}
    for refit in (True, False):
        model = llmspeed.models.tiny("llama", seed=1)
        opts = {**OPTS, **({} if refit else {"refit_scales": False})}
        llmspeed.quantize(model, "int4", 16, method=method, calibration=tokens, method_options=opts)
        layers[refit] = dict(model.linear_layers())[
            "model.layers.0.self_attn.q_proj"
        ]  # the first one: same inputs
    on, off = layers[True], layers[False]
    assert not torch.equal(on.scales, off.scales)
    assert torch.equal(on.qweight, off.qweight) and torch.equal(on.zeros, off.zeros)
    assert torch.equal(on.zeros, on.zeros.round())  # whole zero points: compressed-tensors can store them
