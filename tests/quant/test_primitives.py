"""Properties of the pure primitives: packing round trip, error bounds, nearest NF4 code, double quantization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspeed.quant import primitives as P

SEEDS = st.integers(0, 2**31 - 1)


def _weight(seed: int, out: int, cols: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, cols, generator=g) * scale  # [out, cols]


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, rows=st.integers(1, 5), half=st.integers(1, 40))
def test_pack_unpack_round_trip(seed, rows, half):
    codes = torch.randint(
        0, 16, (rows, 2 * half), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    packed = P.pack_nibbles(codes)
    assert packed.shape == (rows, half)
    assert torch.equal(P.unpack_nibbles(packed), codes)
    # documented layout: element 2j in the low nibble, 2j+1 in the high nibble
    assert torch.equal(packed & 0xF, codes[:, 0::2]) and torch.equal(packed >> 4, codes[:, 1::2])


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, out=st.integers(1, 6), cols=st.integers(1, 70), scale=st.floats(1e-4, 1e3))
def test_int8_error_at_most_half_a_step(seed, out, cols, scale):
    w = _weight(seed, out, cols, scale)
    s = P.choose_qparams_int8(w)
    err = (w - P.dequantize_int8(P.quantize_int8(w, s), s)).abs()  # [out, cols]
    assert (err <= s[:, None] / 2 * (1 + 1e-5) + 1e-30).all()


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, out=st.integers(1, 6), groups=st.integers(1, 4), g=st.sampled_from([2, 16, 32, 64]),
       scale=st.floats(1e-4, 1e3), shift=st.floats(-2, 2))  # fmt: skip
def test_int4_error_at_most_half_a_step(seed, out, groups, g, scale, shift):
    w = _weight(seed, out, groups * g, scale) + shift * scale
    s, z = P.choose_qparams_int4(w, g)
    q = P.quantize_int4(w, s, z, g)
    assert int(q.max()) <= 15 and torch.equal(z, z.round()) and (z >= 0).all() and (z <= 15).all()
    err = (w - P.dequantize_int4(q, s, z, g)).abs().view(out, groups, g)
    assert (err <= s[..., None] / 2 * (1 + 1e-4) + 1e-30).all()


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, out=st.integers(1, 6), groups=st.integers(1, 3), g=st.sampled_from([2, 16, 64]))
def test_nf4_picks_the_nearest_code(seed, out, groups, g):
    w = _weight(seed, out, groups * g, 1.0)
    s = P.choose_qparams_nf4(w, g)
    q = P.quantize_nf4(w, s, g)
    normalized = (w.view(out, groups, g) / s[..., None]).reshape(out, -1, 1)  # [out, cols, 1]
    dist = (normalized - P.NF4_CODEBOOK).abs()  # [out, cols, 16]
    chosen = dist.gather(2, q.long().reshape(out, -1, 1))
    assert (chosen <= dist.min(dim=2, keepdim=True).values + 1e-6).all()


def test_all_zero_rows_quantize_to_exact_zeros():
    w = torch.zeros(3, 64)
    assert torch.equal(P.dequantize_int8(P.quantize_int8(w, s := P.choose_qparams_int8(w)), s), w)
    s, z = P.choose_qparams_int4(w, 32)
    assert torch.equal(P.dequantize_int4(P.quantize_int4(w, s, z, 32), s, z, 32), w)
    s = P.choose_qparams_nf4(w, 32)
    assert torch.equal(P.dequantize_nf4(P.quantize_nf4(w, s, 32), s, 32), w)


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 700))
def test_double_quantization_error_is_small(seed, n):
    scales = torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.01
    q, block, offset = P.double_quantize(scales)
    assert q.dtype == torch.int8 and block.shape == (-(-n // 256),) and offset.shape == (1,)
    back = P.double_dequantize(q, block, offset)
    bound = block[torch.arange(n) // 256] / 2 * (1 + 1e-5) + 1e-7 + scales * 2.0**-11  # + fp16's half step
    assert torch.equal(back, back.half().float())  # stored as fp16 by the kernels: exact
    assert ((back - scales).abs() <= bound).all()


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, g=st.sampled_from([16, 32, 64]), scale=st.floats(1e-9, 1e4), symmetric=st.booleans())
def test_4bit_qparams_lie_on_the_fp16_grid_the_modules_store(seed, g, scale, symmetric):
    """int4/NF4 scales (and int4 zeros) are chosen as fp16 values, clamped into its positive finite range, so the
    codes quantize_* picks are the nearest ones for what an fp16 buffer holds (regression: fp32 scales)."""
    w = _weight(seed, 3, 2 * g, scale)
    choose = P.choose_qparams_int4_symmetric if symmetric else P.choose_qparams_int4
    s, z = choose(w, g)
    s_nf4 = P.choose_qparams_nf4(w, g)
    for t in (s, z, s_nf4):
        assert t.dtype == torch.float32 and torch.equal(t, t.half().float()) and torch.isfinite(t).all()
    assert (s > 0).all() and (s_nf4 > 0).all()
    q = P.quantize_int4(w, s, z, g)
    assert torch.equal(q, P.quantize_int4(w, s.half().float(), z.half().float(), g))
    err = (w - P.dequantize_int4(q, s.half(), z.half(), g)).abs().view(3, 2, g)  # fp16 buffers: fp32 result
    assert P.dequantize_int4(q, s.half(), z.half(), g).dtype == torch.float32
    assert (err <= s[..., None] / 2 * (1 + 1e-4) + 1e-30).all() or scale < 1e-6  # below fp16's range: clamped


def test_tiny_and_zero_groups_quantize_without_nan():
    w = torch.cat([torch.zeros(1, 32), torch.full((1, 32), 1e-12), torch.linspace(-1e-7, 1e-7, 32)[None]])
    for symmetric in (False, True):
        choose = P.choose_qparams_int4_symmetric if symmetric else P.choose_qparams_int4
        s, z = choose(w, 32)
        assert (s >= 2.0**-24).all()
        back = P.dequantize_int4(P.quantize_int4(w, s, z, 32), s, z, 32)
        assert torch.isfinite(back).all() and (back - w).abs().max() < 1e-6
    s = P.choose_qparams_nf4(w, 32)
    assert torch.isfinite(P.dequantize_nf4(P.quantize_nf4(w, s, 32), s, 32)).all()


def test_pad_columns_adds_zeros_on_the_right():
    w = torch.ones(2, 5)
    p = P.pad_columns(w, 8)
    assert p.shape == (2, 8) and torch.equal(p[:, :5], w) and not p[:, 5:].any()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 5),
    k=st.integers(1, 130),
    scale=st.floats(1e-3, 1e3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_int8_activations_round_each_block_of_32_to_its_absmax_grid(seed, rows, k, scale, dtype):
    """quantize_activations: 255 levels of each 32-channel block's absmax, half a step of error at most."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * scale).to(dtype)
    x[0, : min(k, 32)] = 0  # an all-zero block stays exactly zero
    y = P.quantize_activations(x)
    assert y.shape == x.shape and y.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(P.quantize_activations(y), y)  # idempotent: already on the grid
    xf, yf = x.float(), y.float()
    assert not yf[0, : min(k, 32)].any()
    for b in range(0, k, 32):
        blk, out = xf[:, b : b + 32], yf[:, b : b + 32]
        d = blk.abs().amax(-1, keepdim=True) / 127
        codes = out / torch.where(d > 0, d, 1)
        if dtype == torch.float32:
            assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3
            assert ((out - blk).abs() <= d / 2 * (1 + 1e-5) + 1e-30).all()
        else:  # rounded to bf16 afterwards
            assert ((out - blk).abs() <= d / 2 + blk.abs() / 128 + 1e-30).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 40), k=st.integers(1, 200), scale=st.floats(1e-4, 1e4))
def test_the_cpp_rounding_of_activations_equals_the_torch_one_bit_for_bit(seed, rows, k, scale):
    """quant.kernels.cpp.quantize_activations (what a CPU layer with int8 activations uses) = the primitive."""
    from llmspeed.quant.kernels import cpp

    if cpp.extension() is None:
        pytest.skip(f"the C++ kernel is unavailable: {cpp.unavailable()}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * scale
    x[0, : min(k, 40)] = 0
    got = cpp.quantize_activations(x)
    assert got is not None and torch.equal(got, P.quantize_activations(x))
    assert cpp.quantize_activations(x.to(torch.bfloat16)) is None  # the torch primitive handles the rest
    if rows > 1 and k > 1:
        assert cpp.quantize_activations(x.t()) is None  # not contiguous


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_the_cpp_rounding_of_activations_turns_a_block_with_nan_or_inf_into_nan_as_the_torch_one(bad):
    """A NaN or infinity makes its whole 32-channel block NaN (the torch primitive's absmax), never a finite value: the
    C++ vector max dropped NaN lanes, and a NaN input came out as -2^31 * d and made the layer's output finite."""
    from llmspeed.quant.kernels import cpp

    if cpp.extension() is None:
        pytest.skip(f"the C++ kernel is unavailable: {cpp.unavailable()}")
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(0))  # blocks [0, 32), [32, 64), [64, 70)
    x[0, 5] = x[1, 40] = x[2, 67] = bad
    ref = P.quantize_activations(x)
    got = cpp.quantize_activations(x)
    assert got is not None
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    for row, (lo, hi) in enumerate([(0, 32), (32, 64), (64, 70)]):
        assert got[row, lo:hi].isnan().all() and got[row].isnan().sum() == hi - lo  # only the block holding it
