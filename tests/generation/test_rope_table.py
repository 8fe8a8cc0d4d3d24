"""The fused step's rotary table: the model's own rows, rebuilt when the module changes, never for dynamic types."""

from __future__ import annotations

import pytest
import torch

from llmspeed.generation import Generator, SamplingParams
from llmspeed.generation.rope_table import MIN_POSITIONS, RopeTable, static
from llmspeed.models import tiny


def _rows(rotary, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, positions.numel(), 8, dtype=dtype)
    cos, sin = rotary(x, positions[None])  # [1, n, D] each
    return cos[0].float(), sin[0].float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_parameters", [None, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}])
def test_lookup_equals_the_rotary_module(dtype, rope_parameters):
    extra = {} if rope_parameters is None else {"rope_parameters": rope_parameters}
    rotary = tiny("llama", seed=0, **extra).hf.model.rotary_emb
    assert static(rotary)
    table = RopeTable(rotary)
    positions = torch.tensor([0, 5, 17, 1023, 3000])  # the last is past the first table: it grows
    cos, sin = table.lookup(positions, dtype)
    want_cos, want_sin = _rows(rotary, positions, dtype)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    assert cos.dtype == torch.float32 and cos.is_contiguous() and table._cos.shape[0] == 4 * MIN_POSITIONS


def test_whole_tables_cover_the_positions_asked_and_hold_the_lookup_rows():
    rotary = tiny("llama", seed=0).hf.model.rotary_emb
    table = RopeTable(rotary)
    cos, sin = table.tables(5000, torch.bfloat16)  # [P, D] each, grown by doubling
    assert cos.shape[0] == 8 * MIN_POSITIONS and sin.shape == cos.shape and cos.is_contiguous()
    positions = torch.tensor([0, 77, 4999])
    looked = table.lookup(positions, torch.bfloat16)
    assert torch.equal(looked[0], cos[positions]) and torch.equal(looked[1], sin[positions])
    assert table.tables(10, torch.bfloat16)[0] is cos  # covered: not rebuilt
    assert not torch.equal(table.tables(10, torch.float32)[0][:10], cos[:10])  # another dtype rounds otherwise


def test_frequencies_changed_in_place_rebuild_the_table():
    rotary = tiny("llama", seed=0).hf.model.rotary_emb
    table = RopeTable(rotary)
    positions = torch.tensor([3, 40])
    before, _ = table.lookup(positions, torch.float32)
    rotary.inv_freq.mul_(0.5)  # as a user rescaling the frequencies of a loaded model would
    after, _ = table.lookup(positions, torch.float32)
    torch.testing.assert_close(after, _rows(rotary, positions, torch.float32)[0], rtol=0, atol=1e-6)
    assert not torch.allclose(before, after)


def test_dynamic_types_are_not_tabled():
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not static(tiny("llama", seed=0, rope_parameters=dynamic).hf.model.rotary_emb)


def test_a_dynamic_rotary_model_decodes_as_the_generic_path():
    """The fused step computes a dynamic type's rows from the module each step, as the generic path does."""
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = tiny("llama", seed=0, rope_parameters=dynamic)
    prompt = [3, 14, 15, 92, 65, 35]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    fused = Generator(model, kv_cache_tokens=256, progress=False).generate_batched([prompt], params)[0]
    generic = Generator(model, kv_cache_tokens=256, progress=False, fused_decode=False).generate_batched([prompt], params)[0]
    assert fused.token_ids == generic.token_ids


def test_a_burst_declined_for_a_dynamic_rotary_gives_its_blocks_back():
    """Regression: after a fused step, a burst the C++ loop declines (it cannot compute a dynamic rotary's rows) kept
    the blocks taken for it, tokens many steps away, so a request that fits with single steps waited for them."""
    from llmspeed.generation import fused_decode

    if fused_decode.unavailable() is not None:
        pytest.skip("the C++ decode kernel cannot build here")
    model = tiny("llama", seed=0, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    gen = Generator(model, progress=False, num_scheduler_steps=8, block_size=4, kv_cache_tokens=16)
    gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=10, ignore_eos=True))
    gen.step(), gen.step()  # the prefill, then a fused decode step whose burst is declined
    assert "fused cpu" in gen.step_paths and "fused cpu, greedy burst" not in gen.step_paths
    assert gen.blocks.num_free == 3  # one block for the first request's five tokens, as with single steps
    late = gen.add_request([4, 5, 6, 7, 8, 9, 10], SamplingParams(max_new_tokens=2, ignore_eos=True))
    gen.step()
    assert [s.seq_id for s in gen.scheduler.running] == [0, late] and not gen.scheduler.waiting


def test_a_burst_the_fused_loop_cannot_run_leaves_the_prefix_cache_alone():
    """Regression: the blocks of a burst were taken before the runner was asked, so a burst the C++ loop then
    declined (a dynamic rotary) could evict prefix-cache blocks that the request, ending early, never needed; giving
    the blocks back did not restore what they had cached."""
    from llmspeed.generation import fused_decode

    if fused_decode.unavailable() is not None:
        pytest.skip("the C++ decode kernel cannot build here")
    model = tiny("llama", seed=0, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    short = [7]  # one token: with single steps the request ends inside its first block
    greedy = dict(max_new_tokens=6, ignore_eos=True, temperature=0.0)
    out = Generator(model, progress=False).generate_batched([short], SamplingParams(**greedy))[0].token_ids
    stop = next(i for i, t in enumerate(out) if i >= 2 and t not in out[:i])  # a token it first gives at i >= 2
    assert len(short) + stop + 1 <= 4
    gen = Generator(model, progress=False, num_scheduler_steps=8, block_size=4, kv_cache_tokens=16, prefix_caching=True)
    cached = list(range(1, 13))  # three full blocks, cached when the request ends; its fourth block is free again
    gen.generate_batched([cached], SamplingParams(max_new_tokens=1, ignore_eos=True))
    assert gen.blocks.num_cached == 3
    # single steps need the one free block; a burst after the first decode step would take a second, evicting a
    # cached block (the least recently used: the prompt's first)
    ended = gen.generate_batched([short], SamplingParams(**greedy, stop_token_ids=[out[stop]]))
    assert ended[0].token_ids == out[: stop + 1] and "fused cpu" in gen.step_paths
    assert "fused cpu, greedy burst" not in gen.step_paths
    hits = gen.blocks.hit_tokens
    gen.generate_batched([cached], SamplingParams(max_new_tokens=1, ignore_eos=True))
    assert gen.blocks.hit_tokens - hits == 8  # every cached block still found (the last token is always computed)


def test_longrope_is_not_tabled_and_a_changed_attention_scaling_rebuilds_the_table():
    rotary = tiny("llama", seed=0).hf.model.rotary_emb
    table = RopeTable(rotary)
    positions = torch.tensor([3, 40])
    before, _ = table.lookup(positions, torch.float32)
    rotary.attention_scaling = 0.5  # the rows are scaled by it (transformers' yarn/longrope factors)
    after, _ = table.lookup(positions, torch.float32)
    torch.testing.assert_close(after, _rows(rotary, positions, torch.float32)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(after, before * 0.5, rtol=0, atol=1e-6)
    rotary.rope_type = "longrope"  # its frequencies depend on the sequence length
    assert not static(rotary)

