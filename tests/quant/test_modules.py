"""Quantized linear modules: oracle, construction from codes, dtypes, autograd, SNR vs float."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from llmspeed.quant import Int4Linear, Int8Linear, NF4Linear, QuantConfig, module_class
from llmspeed.quant import primitives as P
from llmspeed.quant.kernels import KERNELS
from llmspeed.quant.methods.rtn import rtn_weight

# Minimum signal-to-noise ratio (dB) of a quantized layer's output vs the float layer on Gaussian weights.
SNR_DB = {"int8": 38.0, "int4": 17.0, "nf4": 18.0}
CONFIGS = [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", None), QuantConfig("nf4", 64),
           QuantConfig("nf4", 32, double_quant=True)]  # fmt: skip


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


def _linear(k=100, n=24, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_from_linear_matches_float_layer(config):
    lin = _linear()
    q = module_class(config.format).from_linear(lin, config)
    assert (q.in_features, q.out_features, q.quant_format, q.config) == (100, 24, config.format, config)
    w = q.dequantize()
    assert w.shape == (24, 100) and w.dtype == torch.float32
    x = torch.randn(8, 100)
    with torch.no_grad():
        assert snr_db(lin(x), q(x)) > SNR_DB[config.format]
        assert torch.allclose(q(x), x @ w.T + lin.bias, atol=1e-4, rtol=1e-4)
    assert not any(t.requires_grad for t in q.buffers())


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_from_codes_equals_from_linear(config):
    lin = _linear(bias=False)
    qw = rtn_weight(lin.weight, config)
    a = module_class(config.format).from_codes(qw.codes, qw.scales, qw.zeros, config=config, in_features=100)
    b = module_class(config.format).from_linear(lin, config)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_codes_without_padding_are_padded():
    config = QuantConfig("int4", 64)
    codes = torch.randint(0, 16, (4, 100), dtype=torch.uint8)
    scales, zeros = torch.rand(4, 2), torch.full((4, 2), 8.0)
    m = Int4Linear.from_codes(codes, scales, zeros, config=config)
    assert m.qweight.shape == (4, 64) and m.in_padded == 128
    assert torch.equal(m.codes()[:, :100], codes)
    expected = (codes.float() - 8) * scales.half().float().repeat_interleave(64, 1)[:, :100]  # stored in fp16
    assert torch.equal(m.dequantize(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_forward_keeps_activation_dtype(fmt, dtype):
    q = module_class(fmt).from_linear(_linear(k=64), QuantConfig(fmt))
    x = torch.randn(3, 5, 64, dtype=dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (3, 5, 24)
    ref = x.float() @ q.dequantize().T + q.bias
    assert snr_db(ref, y.float()) > 30


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_backward_reaches_input_not_buffers(fmt):
    q = module_class(fmt).from_linear(_linear(k=64), QuantConfig(fmt))
    x = torch.randn(4, 64, requires_grad=True)
    q(x).pow(2).sum().backward()
    w = q.dequantize()
    expected = (2 * (x.detach() @ w.T + q.bias)) @ w
    assert torch.allclose(x.grad, expected, atol=1e-4)
    assert all(b.grad is None for b in q.buffers()) and q.bias.grad is None


def test_wrong_config_or_shapes_raise():
    with pytest.raises(ValueError, match="config.format"):
        Int8Linear(8, 4, QuantConfig("int4"))
    with pytest.raises(ValueError, match="scales must have shape"):
        Int8Linear.from_codes(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), config=QuantConfig("int8"))
    with pytest.raises(ValueError, match="zeros must be given"):
        Int4Linear.from_codes(
            torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1), config=QuantConfig("int4", 8)
        )
    with pytest.raises(ValueError, match="codes must be"):
        NF4Linear.from_codes(
            torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1), config=QuantConfig("nf4", 8)
        )
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(2, 2, 1))
    q = Int8Linear.from_linear(_linear(k=8))
    with pytest.raises(ValueError, match="8 features"):
        q(torch.randn(2, 9))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"format": "int3"}, "format must be one of"), ({"format": "int4", "group_size": 0}, "group_size must be"),
     ({"format": "int4", "group_size": -8}, "group_size must be"), ({"format": "int4", "group_size": 33}, "even"),
     ({"format": "int8", "group_size": 24}, "int8 must be None .* or a positive multiple of 16 .*got 24"),
     ({"format": "int4", "double_quant": True}, "only defined for nf4"),
     # these named the 4-bit rules (evenness, positivity) for int8, as if an even group size would do
     ({"format": "int8", "group_size": 7}, "int8 must be None.*got 7"), ({"format": "int8", "group_size": 0}, "int8 must be None.*got 0"),
     ({"format": "int8", "group_size": True}, "int8 must be None.*got True"),
     ({"format": "int4", "method": 3}, "method must be a name")],
)  # fmt: skip
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


@pytest.mark.parametrize(
    "config, match",
    [(QuantConfig("int4", method="magic"), "method must be one of"), (QuantConfig("nf4", kernel="aten_int8"), "kernel for nf4"),
     (QuantConfig("int8", kernel="nope"), "kernel for int8")],
)  # fmt: skip
def test_modules_reject_names_missing_from_the_registries(config, match):
    # QuantConfig is plain data (it imports no registry); the modules check its names when built
    with pytest.raises(ValueError, match=match):
        module_class(config.format).from_linear(_linear(k=64), config)


def test_config_round_trips_through_dict():
    c = QuantConfig("nf4", 128, double_quant=True)
    assert QuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown keys"):
        QuantConfig.from_dict({**c.to_dict(), "bits": 4})


def test_nf4_double_quant_codes_are_nearest_for_stored_scales():
    config = QuantConfig("nf4", 32, double_quant=True)
    q = NF4Linear.from_linear(_linear(k=64, n=40), config)
    w = _linear(k=64, n=40).weight.detach()
    s = q.group_scales()  # [out, groups]
    normalized = (w.view(40, 2, 32) / s[..., None]).reshape(40, -1, 1)
    dist = (normalized - P.NF4_CODEBOOK).abs()
    chosen = dist.gather(2, q.codes().long().reshape(40, -1, 1))
    assert (chosen <= dist.min(dim=2, keepdim=True).values + 1e-6).all()


@pytest.mark.parametrize("rows", [slice(1, 40, 3), slice(30, 38), torch.tensor([0, 33, 5, 39])], ids=["step", "run", "indices"])
def test_nf4_double_quant_dequantizes_any_rows_as_those_rows_of_the_whole(rows):
    """Regression: group_scales met each scale with the block of its position in a contiguous run, so a strided
    slice dequantized rows with other blocks' scales (silently wrong), and int64 row indices, which dequantize()
    documents, raised TypeError from Tensor.indices."""
    q = NF4Linear.from_linear(_linear(k=256, n=40), QuantConfig("nf4", 32, double_quant=True))  # 32 rows a block
    assert q.scales_scale.numel() > 1 and q.scales_scale.unique().numel() > 1  # blocks differ
    assert torch.equal(q.dequantize(rows=rows), q.dequantize()[rows])


def test_copies_do_not_share_bound_kernels():
    import copy

    q = Int8Linear.from_linear(_linear(k=64, bias=False))
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = q(x)
        twin = copy.deepcopy(q)
        assert twin._kernels == {} and torch.equal(twin(x), ref)
        twin.qweight.zero_()
        assert torch.equal(q(x), ref) and not twin(x).any()


@pytest.mark.parametrize("fmt, kernel, options", [
    ("nf4", "cpp", {"double_quant": True}), ("nf4", "amx", {"double_quant": True}), ("int4", "aten_int4_cpu", {}),
    ("int4", "amx", {}), ("int8", "aten_int8", {}), ("int4", "cpp_panels", {"activations": "int8"}),
    ("int8", "cpp_panels", {"activations": "int8"}),
])  # fmt: skip
def test_kernels_follow_buffers_loaded_in_place(fmt, kernel, options):
    """Kernels prepare tensors from the buffers once (NF4's expanded double-quantized scales, aten's repacked int4
    weight) and keep them by the weight's pointer; ``load_state_dict`` copies in place, keeping the pointers, so the
    module drops what its kernels prepared when a state is loaded (the fused step once missed the same change)."""
    from llmspeed import kernels

    if not next(row["available"] for row in kernels().kernels if row["kernel"] == kernel):
        pytest.skip(f"kernel {kernel} is not available here")
    config = QuantConfig(fmt, None if fmt == "int8" else 32, kernel=kernel, **options)
    probe = module_class(fmt).from_linear(nn.Linear(128, 64, bias=False), replace(config, kernel="auto"))
    why = KERNELS[kernel].why_not(probe, torch.randn(3, 128))  # e.g. cpp_panels takes int8 weights on VNNI only
    if why is not None:
        pytest.skip(why)
    torch.manual_seed(0)
    q, other = (module_class(fmt).from_linear(nn.Linear(128, 64, bias=False), config) for _ in range(2))
    x = torch.randn(3, 128)
    with torch.no_grad():
        before = q(x)  # the kernel prepares its tensors
        q.load_state_dict(other.state_dict())
        out, ref = q(x), other(x)
    assert not torch.allclose(before, ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_act_order_int4_gathers_its_input_through_perm():
    """A GPTQ desc_act layer: packed column j is input column perm[j]; forward, backward and dequantize agree."""
    from llmspeed.quant import QuantConfig
    from llmspeed.quant.methods.rtn import rtn_weight

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24, bias=True)
    perm = torch.randperm(64)
    cfg = QuantConfig("int4", 16, act_order=True)
    packed_weight = linear.weight.detach()[:, perm]  # [out, in] in packed order
    qw = rtn_weight(packed_weight, cfg)
    m = Int4Linear.from_codes(qw.codes, qw.scales, qw.zeros, config=cfg, bias=linear.bias.detach())
    m.perm.copy_(perm)
    plain = Int4Linear.from_codes(qw.codes, qw.scales, qw.zeros, config=QuantConfig("int4", 16))
    w = m.dequantize()  # [out, in], original order
    assert torch.equal(w[:, perm], plain.dequantize())
    x = torch.randn(3, 64, requires_grad=True)
    y = m(x)
    assert torch.allclose(y, x @ w.T + linear.bias, atol=1e-5)
    y.sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(3, -1), atol=1e-5)
    with pytest.raises(ValueError, match="act_order .* only defined for int4"):
        QuantConfig("nf4", 16, act_order=True)


@pytest.mark.parametrize("config", [QuantConfig("int4", 64, activations="int8"), QuantConfig("int8", activations="int8"),
                                    QuantConfig("nf4", 32, activations="int8")], ids=str)  # fmt: skip
def test_int8_activations_multiply_the_rounded_input(config):
    """activations="int8": the layer computes quantize_activations(x) @ dequantize().T, and gradients pass through."""
    lin = _linear(k=100, n=24)
    q = module_class(config.format).from_linear(lin, config)
    plain = module_class(config.format).from_linear(lin, QuantConfig(config.format, config.group_size))
    x = torch.randn(3, 5, 100, requires_grad=True)
    y = q(x)
    ref = P.quantize_activations(x.detach()) @ q.dequantize().T + lin.bias.detach()
    assert torch.allclose(y, ref, atol=1e-5)
    assert not torch.allclose(y, plain(x), atol=1e-6)  # the rounding is there
    y.sum().backward()  # straight-through: the float layer's gradient
    assert torch.allclose(x.grad, q.dequantize().sum(0).expand(3, 5, -1), atol=1e-5)
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert QuantConfig.from_dict({"format": "int4"}).activations == "float"  # files written before the field


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_int8_activations_of_a_16_bit_input_are_rounded_in_fp32(dtype):
    """Regression: a bf16 input's int8 codes times their block scale were rounded back to bf16 before the matmul
    (about 2^-9 of each value), so the generic path of a bf16 model differed from the fused decode step, which
    multiplies the exact codes, and gave other tokens. The 16-bit layer now computes what the fp32 layer
    computes on the same (16-bit) values, rounded once at the output."""
    lin = _linear(k=100, n=24)
    q = module_class("int4").from_linear(lin, QuantConfig("int4", 32, activations="int8"))
    x = torch.randn(4, 100).to(dtype)  # values a 16-bit model hands its layers
    with torch.no_grad():
        y = q(x)
        ref = q(x.float())
    assert y.dtype == dtype
    assert torch.equal(y, ref.to(dtype))


def test_bad_activations_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"activations must be one of \['float', 'int8'\]; got 'int4'"):
        QuantConfig("int4", activations="int4")


def test_4bit_scales_and_zeros_are_fp16_and_int4_g32_takes_g64_fp32_bytes():
    """4-bit scales and zeros are stored in fp16 (4 bytes a group for int4, 2 for NF4); int8's row scales stay fp32."""
    lin = _linear(k=128, n=16)
    int4_32 = Int4Linear.from_linear(lin, QuantConfig("int4", 32))
    nf4 = NF4Linear.from_linear(lin, QuantConfig("nf4", 64))
    int8 = Int8Linear.from_linear(lin)
    assert int4_32.scales.dtype == int4_32.zeros.dtype == nf4.scales.dtype == torch.float16
    assert int8.scales.dtype == torch.float32
    nbytes = sum(b.numel() * b.element_size() for b in int4_32.buffers())
    assert nbytes == 16 * 128 // 2 + 16 * (128 // 32) * 4  # codes + fp16 scale and zero: 5 bits a weight
    # the oracle computes in fp32 from the stored fp16 values
    w = int4_32.dequantize()
    ref = P.dequantize_int4(int4_32.codes(), int4_32.scales.float(), int4_32.zeros.float(), 32)[:, :128]
    assert w.dtype == torch.float32 and torch.equal(w, ref)


def test_cpp_4bit_kernels_refuse_fp32_scales_by_name():
    from llmspeed.quant.kernels import cpp

    if cpp.unavailable():
        pytest.skip(cpp.unavailable())
    m = Int4Linear.from_linear(_linear(k=64, n=8), QuantConfig("int4", 32))
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="4-bit scales and zeros must be contiguous float16; got Float"):
        cpp.extension().int4_matmul(x, m.qweight, m.scales.float(), m.zeros.float(), 32)
    assert torch.equal(cpp.extension().int4_matmul(x, m.qweight, m.scales, m.zeros, 32), cpp.fused_cpu(m, x))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_dtype_casts_leave_the_quantization_state_alone(config):
    """Regression: ``model.to(torch.bfloat16)`` (or ``.half()``) cast the scales too, and the kernels then refused
    them (int8: "scales must be contiguous fp32") or, for 4-bit, lost fp16's bits. Only the bias follows a cast."""
    m = module_class(config.format).from_linear(_linear(), config)
    before = {n: b.clone() for n, b in m.named_buffers()}
    x = torch.randn(3, 100).to(torch.bfloat16)
    ref = m(x)
    for cast in (lambda mod: mod.to(torch.bfloat16), lambda mod: mod.half(), lambda mod: mod.float()):
        cast(m)
        assert all(b.dtype == before[n].dtype and torch.equal(b, before[n]) for n, b in m.named_buffers())
    m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16
    torch.testing.assert_close(m(x), ref, rtol=0.02, atol=0.02)  # only the bias was rounded to bf16
