"""The LoRA stacks the fused CPU decode step reads: blocks of 16 outputs, fp16 rounding, overflow kept in fp32, and
groups that mix both."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import lora
from llmspeed.generation import Generator, fused_decode, fused_lora
from llmspeed.generation.runner import StepInput

from .test_fused_decode import LOGIT_TOLERANCE, _prefilled
from .test_fused_lora import FP16_LORA_TOLERANCE, _routed_logits, _with_adapters

pytestmark = pytest.mark.skipif(fused_decode.unavailable() is not None, reason="the C++ decode kernel cannot build here")


def test_b_stacks_hold_blocks_of_16_outputs_zero_padded():
    """B [S, NB, R, 16]: output o of rank r at [s, o // 16, r, o % 16], scale folded in, zeros past out_features."""
    from llmspeed.lora.layer import LoraLinear

    layer = LoraLinear(torch.nn.Linear(24, 40, bias=False))
    layer.add("x", r=3, scale=0.5, init="random")
    layer.add("y", r=2, scale=2.0, init="random")
    a, b = fused_lora.stacks(layer, ["x", "y"], torch.float32)
    assert a.shape == (2, 3, 24) and b.shape == (2, 3, 3, 16)  # 40 outputs: 3 blocks, the last half padding
    for s, (name, scale) in enumerate([("x", 0.5), ("y", 2.0)]):
        r = layer.rank(name)
        flat = b[s].transpose(0, 1).reshape(3, 48)[:r]  # [R, NB * 16]
        assert torch.equal(flat[:, :40], layer.weight_b(name).T * scale)
        assert not flat[:, 40:].any() and not b[s, :, r:].any()  # padding outputs and padding ranks
        assert torch.equal(a[s, :r], layer.weight_a(name))


def test_fp16_stacks_round_each_weight_and_float32_stacks_are_exact():
    model = llmspeed.quantize(llmspeed.models.tiny("llama", seed=6), "int4", group_size=32)
    _with_adapters(model, fp16_exact=False)
    gen, decode = _prefilled(model, [5, 9, 3])
    names = ["a", "b", None]
    step = StepInput.decode(decode, gen.blocks.block_size)
    ref = _routed_logits(model, gen, decode, names)
    exact = fused_decode.FusedDecode(model, gen.cache, lora_dtype=torch.float32).run(step, names)
    half = fused_decode.FusedDecode(model, gen.cache).run(step, names)
    err = [(out - ref).abs().max() / ref.abs().max() for out in (exact, half)]
    assert err[0] < LOGIT_TOLERANCE[torch.float32]
    assert LOGIT_TOLERANCE[torch.float32] < err[1] < FP16_LORA_TOLERANCE  # fp16 rounding shows, and stays small
    with pytest.raises(ValueError, match="lora_dtype must be one of .*got torch.bfloat16"):
        fused_decode.FusedDecode(model, gen.cache, lora_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="lora_dtype must be fp16 or fp32 .*; got 'bf16'"):
        Generator(model, lora_dtype="bf16")
    for spelling in ("float32", torch.float32, "FP32"):
        assert Generator(model, lora_dtype=spelling, kv_cache_tokens=64).runner.fused.lora_dtype == torch.float32


def test_stacks_that_overflow_fp16_stay_fp32():
    model = _with_adapters(llmspeed.models.tiny("llama", seed=0))
    layer = next(layer for _, layer in lora.lora_layers(model))
    assert [t.dtype for t in fused_lora.stacks(layer, ["a", "b"])] == [torch.float16] * 2
    with torch.no_grad():
        layer.weight_b("a")[0, 0] = 1e5  # times the scale 2: past fp16's 65504
    a, b = fused_lora.stacks(layer, ["a", "b"])
    assert a.dtype == b.dtype == torch.float32 and b[0, 0, 0, 0] == 2e5  # slot a, block 0, rank 0, output 0


def test_a_group_mixing_fp16_and_fp32_stacks_gives_the_generic_logits():
    """q_proj of layer 0 overflows fp16 (its stacks stay fp32) while k and v, in the same C++ group, are fp16.

    Its B is scaled down with it, so q stays of ordinary size: a delta of 70000 x B saturates attention, where a
    rounding of 1e-7 in q (the reference's matmuls round differently with their buffers' alignment) moved the
    logits by 6e-5 of their largest in one full-suite run (the fused step agrees to 4e-7 otherwise)."""
    model = _with_adapters(llmspeed.models.tiny("llama", seed=7))
    q = model.hf.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight_a("a")[0, 0] = 70000.0  # past fp16's 65504
        q.weight_b("a").mul_(1e-4)
    gen, decode = _prefilled(model, [4, 6, 5])
    fused = fused_decode.FusedDecode(model, gen.cache)
    names = ["a", "b", "a"]
    out = fused.run(StepInput.decode(decode, gen.blocks.block_size), names)
    stacks = fused._snapshot.lora
    assert stacks[0].dtype == torch.float32 and stacks[2].dtype == torch.float16  # layer 0: q, then k
    ref = _routed_logits(model, gen, decode, names)
    assert torch.isfinite(ref).all() and (out - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
