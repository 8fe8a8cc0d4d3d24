"""Group-wise int8 (``QuantConfig("int8", group_size=G)``, GGUF's ``Q8_0`` at 32): rounding, layout, the kernels,
save/load, the GGUF export of groups shorter than a ``Q8_0`` block, and refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmspeed
from llmspeed.quant import Int8Linear, QuantConfig
from llmspeed.quant import primitives as P
from llmspeed.quant.kernels import KERNELS


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), k=st.integers(1, 130), group=st.sampled_from([16, 32, 48, 64]), seed=st.integers(0, 999))
def test_each_group_rounds_to_its_own_fp16_scale(rows, k, group, seed):
    """Every column is within half a step of its group's scale (the last group may be shorter), the scale is the
    group's absmax / 127 rounded up to fp16, and the module's dequantize is codes times those scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.rand(k, generator=g) * 4  # groups of different ranges
    w[0, : min(k, group)] = 0.0  # an all-zero group: the smallest positive scale, codes 0
    scales = P.choose_qparams_int8(w, group)  # [rows, groups]
    groups = -(-k // group)
    assert scales.shape == (rows, groups) and torch.equal(scales, scales.half().float())
    absmax = P.pad_columns(w.abs(), groups * group).reshape(rows, groups, group).amax(-1)  # [rows, groups]
    assert bool((scales * 127 >= absmax).all()) and bool((scales > 0).all())
    codes = P.quantize_int8(w, scales, group)
    per_column = scales.repeat_interleave(group, 1)[:, :k]  # [rows, k]
    assert bool(((codes.float() * per_column - w).abs() <= per_column / 2 + 1e-7).all())
    module = Int8Linear.from_codes(codes, scales, config=QuantConfig("int8", group), in_features=k)
    assert module.scales.dtype == torch.float16 and torch.equal(module.dequantize(), codes.float() * per_column)
    assert module.layout.groups == groups and module.layout.group == group and module.layout.grouped_int8


def test_quantize_rounds_every_layer_by_group_and_the_cpp_kernel_runs_it():
    model = llmspeed.models.tiny("llama", seed=3)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.hf(ids).logits
    llmspeed.quantize(model, "int8", group_size=32)
    layers = dict(model.linear_layers())
    assert all(isinstance(m, Int8Linear) and m.config.group_size == 32 for m in layers.values())
    head = layers["lm_head"]
    x = torch.randn(3, head.in_features)
    assert KERNELS["cpp"].why_not(head, x) is None and KERNELS["aten_int8"].why_not(head, x) is not None
    with torch.no_grad():
        got = model.hf(ids).logits
    assert (got - want).abs().max() < 0.02 * want.abs().max()  # 8 bits a weight, a scale per 32


def test_group_wise_int8_saves_and_loads_bit_for_bit(tmp_path):
    model = llmspeed.models.tiny("qwen2", seed=1)
    llmspeed.quantize(model, "int8", group_size=48)  # 64 inputs: a group of 48 and one of 16
    back = llmspeed.load(llmspeed.save(model, tmp_path / "m"))
    a, b = model.hf.state_dict(), back.hf.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert all(m.config.group_size == 48 for _, m in back.linear_layers())


def test_groups_shorter_than_a_q8_0_block_go_to_gguf_as_floats_with_a_warning(tmp_path):
    """int8 at group 16 (what a Q6_K layer reads as) has no block type llmspeed writes: its dequantized weight is."""
    pytest.importorskip("gguf")
    model = llmspeed.models.tiny("llama", seed=0, hidden_size=128, intermediate_size=256)
    llmspeed.quantize(model, "int8", group_size=16, include=["*.mlp.down_proj"])
    downs = {n: m.dequantize() for n, m in model.linear_layers() if n.endswith("down_proj")}
    with pytest.warns(UserWarning, match=r"2 int8 layer\(s\) at group 16 .* are written dequantized"):
        path = llmspeed.save(model, tmp_path / "m.gguf", format="gguf")
    back = dict(llmspeed.load(path).linear_layers())
    for name, weight in downs.items():
        assert isinstance(back[name], nn.Linear) and torch.equal(back[name].weight, weight), name


def test_bad_group_wise_int8_is_refused_before_any_layer_changes():
    model = llmspeed.models.tiny("llama", seed=0)
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    for kwargs, match in [
        (dict(group_size=24), "group_size for int8 must be None .* or a positive multiple of 16 .*got 24"),
        (dict(group_size=32, method="hqq"), r"group-wise int8 \(group_size=32\) is quantized by method in \['rtn'\]"),
        (dict(group_size=32, kernel="aten_int8"), "aten_int8"),
    ]:
        with pytest.raises(ValueError, match=match):
            llmspeed.quantize(model, "int8", **kwargs)
        after = model.hf.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), kwargs
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 2\)"):
        Int8Linear.from_codes(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4), config=QuantConfig("int8", 32))
    with pytest.raises(ValueError, match="group_size must be None for int8 in quantization-aware training"):
        llmspeed.qat.prepare(model, "int8", group_size=32)


def test_a_gguf_file_loads_with_int8_activations_as_llama_cpp_computes_it(tmp_path):
    """``load(path, activations="int8")``: every quantized layer of the file multiplies int8 activation codes (what
    llama.cpp does with Q8_0 / Q8_1 activations), exactly as the same model quantized with ``activations="int8"``;
    the fused decode step (integer codes for group-wise int8) gives the generic path's tokens."""
    pytest.importorskip("gguf")
    from llmspeed.generation import Generator, SamplingParams

    model = llmspeed.quantize(llmspeed.models.tiny("llama", seed=5), "int8", group_size=32, lm_head="int8")
    path = llmspeed.save(model, tmp_path / "m.gguf", format="gguf")
    want = llmspeed.quantize(llmspeed.models.tiny("llama", seed=5), "int8", group_size=32, lm_head="int8",
                             activations="int8")
    plain, act8 = llmspeed.load(path), llmspeed.load(path, activations="int8")
    assert {m.config.activations for _, m in plain.linear_layers()} == {"float"}
    assert {(m.config.activations, m.config.group_size) for _, m in act8.linear_layers()} == {("int8", 32)}
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, ref, floats = act8.hf(ids).logits, want.hf(ids).logits, plain.hf(ids).logits
    assert torch.equal(got, ref) and not torch.equal(got, floats)
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    fused = Generator(act8, progress=False, block_size=4, kv_cache_tokens=256)
    generic = Generator(act8, progress=False, block_size=4, kv_cache_tokens=256, fused_decode=False)
    assert fused.fused_decode_status == "on"
    prompts = [[1, 2, 3], [7, 9, 11, 13, 15]]
    assert [o.token_ids for o in fused.generate_batched(prompts, sp)] == [o.token_ids for o in generic.generate_batched(prompts, sp)]


def test_load_refuses_unknown_activations_before_reading_anything(tmp_path):
    with pytest.raises(ValueError, match=r"activations must be None \(as the checkpoint says\) or one of \['float', 'int8'\]; got 'int4'"):
        llmspeed.load(tmp_path / "missing", activations="int4")


def test_set_activations_switches_one_layer_in_place_or_refuses_before_changing_it():
    layer = Int8Linear.from_linear(nn.Linear(64, 8), QuantConfig("int8", 32))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    floats = layer(x)
    layer.set_activations("int8")
    assert layer.config.activations == "int8" and not torch.equal(layer(x), floats)
    torch.testing.assert_close(layer(x), P.quantize_activations(x) @ layer.dequantize().T + layer.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"activations must be one of \['float', 'int8'\]; got 'int4'"):
        layer.set_activations("int4")
    assert layer.config.activations == "int8"
    layer.set_activations("float")
    assert torch.equal(layer(x), floats)
