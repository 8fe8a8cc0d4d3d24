"""LoRA adapters in the fused CPU decode step: per-row adapters give the generic path's logits and tokens."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import lora
from llmspeed.generation import Generator, SamplingParams, fused_decode
from llmspeed.generation.runner import StepInput

from .test_fused_decode import LOGIT_TOLERANCE, _generic_logits, _prefilled

pytestmark = pytest.mark.skipif(fused_decode.unavailable() is not None, reason="the C++ decode kernel cannot build here")


def _with_adapters(model, seed=0):
    """Adapters "a" (r=4, every projection) and "b" (r=8, q and v only) with random, non-zero B."""
    lora.add_adapter(model, "a", r=4, alpha=8)
    lora.add_adapter(model, "b", r=8, alpha=4, targets=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for name in layer.lora_A:
                layer.weight_b(name).copy_(torch.randn(layer.weight_b(name).shape, generator=g) * 0.05)
    lora.set_adapter(model, None)
    return model


def _fused_step(seed, lengths):
    """A model with adapters "a" and "b", its prefilled generator, the decode list, a FusedDecode and the step."""
    model = _with_adapters(llmspeed.models.tiny("llama", seed=seed))
    gen, decode = _prefilled(model, lengths)
    return model, gen, decode, fused_decode.FusedDecode(model, gen.cache), StepInput.decode(decode, gen.blocks.block_size)


def _routed_logits(model, gen, decode, names):
    with lora.per_token_adapters(model, names):
        return _generic_logits(model, gen, decode)


@pytest.mark.parametrize("fmt", [None, "int8", "int4", "nf4"])
def test_each_row_gets_its_own_adapter(fmt):
    model = llmspeed.models.tiny("llama", seed=4)
    if fmt is not None:
        llmspeed.quantize(model, fmt, **({} if fmt == "int8" else {"group_size": 32}))
    _with_adapters(model)
    assert fused_decode.unsupported(model) is None
    gen, decode = _prefilled(model, [3, 9, 4, 17, 6])
    names = ["a", None, "b", "a", "b"]
    fused = fused_decode.FusedDecode(model, gen.cache).run(StepInput.decode(decode, gen.blocks.block_size), names)
    ref = _routed_logits(model, gen, decode, names)
    base = _generic_logits(model, gen, decode)
    assert fused is not None
    assert (fused - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    changed = (ref - base).abs().amax(-1) > 1e-3  # the adapters do change those rows
    assert changed.tolist() == [True, False, True, True, True]


def test_the_active_adapter_applies_when_no_row_names_one():
    model = _with_adapters(llmspeed.models.tiny("llama", seed=1))
    lora.set_adapter(model, "b")
    gen, decode = _prefilled(model, [5, 8])
    fused = fused_decode.FusedDecode(model, gen.cache).run(StepInput.decode(decode, gen.blocks.block_size))
    ref = _generic_logits(model, gen, decode)  # LoraLinear.forward applies the active adapter
    assert (fused - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


def test_adapters_changed_in_place_are_restacked():
    model, gen, decode, runner, step = _fused_step(2, [4, 7])
    before = runner.run(step, ["a", "a"])
    with torch.no_grad():  # what an optimizer step does: same tensors, new values
        for _, layer in lora.lora_layers(model):
            layer.weight_b("a").mul_(3.0)
    after = runner.run(step, ["a", "a"])
    ref = _routed_logits(model, gen, decode, ["a", "a"])
    assert not torch.allclose(before, after)
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


def test_it_steps_aside_for_merged_adapters_and_live_dropout():
    model, _, _, runner, step = _fused_step(0, [4, 6])
    assert runner.run(step, ["a", None]) is not None
    assert runner.run(step, ["nope", None]) is None  # an unknown name: the generic path reports it
    lora.add_adapter(model, "c", r=2, dropout=0.1)
    model.hf.train()
    assert "dropout in training mode" in fused_decode.unsupported(model)
    assert runner.run(step, ["a", None]) is None
    model.hf.eval()
    lora.merge(model, "a")
    assert "merged into the base" in fused_decode.unsupported(model)


def test_the_generator_serves_many_adapters_on_the_fused_path():
    model = _with_adapters(llmspeed.models.tiny("llama", seed=5))
    prompts = [[1, 2, 3], list(range(40, 70)), [7] * 11, [9, 8, 7, 6]]
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, adapter=a) for a in ("a", None, "b", "a")]
    on = Generator(model, progress=False, block_size=8)
    off = Generator(model, progress=False, block_size=8, fused_decode=False)
    assert on.fused_decode_status == "on"
    fused_out = [on.generate_batched([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    batched = on.generate_batched(prompts, params)
    generic = off.generate_batched(prompts, params)
    assert [o.token_ids for o in batched] == [o.token_ids for o in generic] == fused_out
    assert on.step_paths["fused cpu"][0] > 0 and "fused cpu" not in off.step_paths
