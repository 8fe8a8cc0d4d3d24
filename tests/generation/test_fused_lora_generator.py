"""The Generator on the fused CPU decode path with LoRA adapters: when it steps aside, many adapters served, mixed
steps routed, and ``adapter=False`` (the base alone)."""

from __future__ import annotations

import pytest

import llmspeed
from llmspeed import lora
from llmspeed.generation import Generator, SamplingParams, fused_decode
from llmspeed.generation.runner import StepInput

from .test_fused_decode import _prefilled
from .test_fused_lora import _fused_step, _with_adapters
from .test_fused_mixed import _staggered

pytestmark = pytest.mark.skipif(fused_decode.unavailable() is not None, reason="the C++ decode kernel cannot build here")


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


def test_fused_decode_status_follows_a_model_changed_under_the_generator():
    """Regression: the status was set once, when the generator was built: after an adapter was added to the
    output head (which the fused step does not take) it still said "on" while every step ran the generic path."""
    model = llmspeed.models.tiny("llama", seed=5)
    gen = Generator(model, progress=False, block_size=8)
    assert gen.fused_decode_status == "on"
    lora.add_adapter(model, "head", r=4, targets=["lm_head"])
    gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert not any(path.startswith("fused") for path in gen.stats.step_paths)
    assert gen.fused_decode_status.startswith("off (lm_head"), gen.fused_decode_status
    lora.delete_adapter(model, "head")
    gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert gen.fused_decode_status == "on" and "fused cpu" in gen.stats.step_paths


def test_mixed_steps_route_each_chunk_to_its_adapter():
    """Prompt chunks on the fused step (``mixed=True``): every token row of a chunk takes its request's adapter,
    beside decode rows with other adapters; same tokens as the per-layer path."""
    model = _with_adapters(llmspeed.models.tiny("llama", seed=5))
    prompts = [[1, 2, 3], list(range(40, 110)), [7] * 11, [9, 8, 7, 6]]
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True, adapter=a) for a in ("a", None, "b", "a")]
    out = []
    for mixed in (True, False):
        gen = Generator(model, progress=False, block_size=8, max_batch_tokens=48)
        gen.runner.fused.mixed = mixed
        out.append((_staggered(gen, prompts, params), set(gen.step_paths)))
    (fused, fused_paths), (generic, generic_paths) = out
    assert fused == generic and all(len(t) == 8 for t in fused)
    assert "fused cpu mixed" in fused_paths and "fused cpu mixed" not in generic_paths


def test_layers_set_to_different_adapters_take_the_generic_path():
    """One snapshot-wide active adapter cannot describe layers set to different ones: the step steps aside."""
    model = _with_adapters(llmspeed.models.tiny("llama", seed=1))
    lora.set_adapter(model, "a")
    model.hf.model.layers[0].self_attn.q_proj.active = "b"  # one layer set otherwise
    gen, decode = _prefilled(model, [5, 8])
    assert fused_decode.FusedDecode(model, gen.cache).run(StepInput.decode(decode, gen.blocks.block_size)) is None


@pytest.mark.parametrize("fused", [True, False])
def test_adapter_false_runs_the_base_alone_whatever_adapter_is_active(fused):
    """``SamplingParams(adapter=False)`` (what the server runs for the base model's name beside served adapters)
    gives the model's tokens before any adapter was added, batched beside rows that run the active adapter and
    rows that name one, in single steps and greedy bursts; its prefix-cache blocks are not the active adapter's."""
    model = llmspeed.models.tiny("llama", seed=6)
    prompts = [list(range(40, 70)), [1, 2, 3], [9, 8, 7, 6]]
    sp = dict(max_new_tokens=10, ignore_eos=True)
    base = [o.token_ids for o in Generator(model, progress=False).generate_batched(prompts, SamplingParams(**sp))]
    _with_adapters(model)
    lora.set_adapter(model, "a")
    kw = dict(progress=False, block_size=8, fused_decode=fused, prefix_caching=True)
    alone = {a: [Generator(model, **kw).generate_batched([p], SamplingParams(**sp, adapter=a))[0].token_ids
                 for p in prompts] for a in ("a", "b")}  # fmt: skip
    assert alone["a"] != base and alone["b"] != base  # the adapters change the tokens
    gen = Generator(model, **kw)
    mixed = [SamplingParams(**sp, adapter=a) for a in (False, None, "b")]
    outs = [o.token_ids for o in gen.generate_batched(prompts, mixed)]
    assert outs == [base[0], alone["a"][1], alone["b"][2]]
    # the same prompt under the active adapter, then alone: the second must not reuse the first's cached blocks
    assert gen.generate_batched([prompts[0]], SamplingParams(**sp))[0].token_ids == alone["a"][0]
    assert gen.generate_batched([prompts[0]], SamplingParams(**sp, adapter=False))[0].token_ids == base[0]
    burst = Generator(model, **kw, num_scheduler_steps=4)
    assert [o.token_ids for o in burst.generate_batched(prompts, SamplingParams(**sp, adapter=False))] == base
    assert ("fused cpu" in gen.step_paths) == fused
    if fused:
        assert "fused cpu, greedy burst" in burst.step_paths


def test_adapter_accepts_false_but_not_true():
    assert SamplingParams(adapter=False).adapter is False
    with pytest.raises(ValueError, match=r"`adapter` must be None \(the active adapter\), False"):
        SamplingParams(adapter=True)
