"""Prefix caching: a stateful model of the block manager, and the generator's outputs with and without it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmspeed import Generator, SamplingParams
from llmspeed.generation.block_manager import BlockManager, blocks_for

BS = 2


class PrefixCacheMachine(RuleBasedStateMachine):
    """Sequences over a two-token alphabet share prefixes often; slots record which prefix they hold."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(10, BS, prefix_caching=True)
        self.live: dict[int, dict] = {}  # seq -> {"tokens", "table", "computed", "keys"}
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, offset) -> prefix whose KV is there
        self.next = 0

    @rule(tokens=st.lists(st.integers(1, 2), min_size=1, max_size=9))
    def admit(self, tokens):
        hits = self.bm.match(tokens)
        assert len(hits) <= (len(tokens) - 1) // BS  # the block of the last token is never shared
        for i, block in enumerate(hits):  # a hit holds exactly this prefix's keys and values
            for j in range(BS):
                assert self.slots[(block, j)] == tuple(tokens[: i * BS + j + 1])
        if not self.bm.can_admit(hits, len(tokens)):
            return
        seq, table = self.next, []
        self.next += 1
        self.bm.admit(seq, table, hits, len(tokens))
        assert len(table) == blocks_for(len(tokens), BS) and table[: len(hits)] == hits
        self.live[seq] = {"tokens": tokens, "table": table, "computed": len(hits) * BS, "keys": []}

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute(self, data):
        seq = data.draw(st.sampled_from(sorted(self.live)))
        s = self.live[seq]
        end = data.draw(st.integers(s["computed"], len(s["tokens"])))
        for pos in range(s["computed"], end):  # a step writes these tokens' keys and values
            block = s["table"][pos // BS]
            assert self.bm.owners(block) == {seq}, "a shared block was written"
            assert block not in self.bm._key_of, "a registered block was written"
            self.slots[(block, pos % BS)] = tuple(s["tokens"][: pos + 1])
        s["computed"] = end
        self.bm.register(s["table"], s["tokens"], end, None, s["keys"])

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data):  # finish, abort or preemption alike
        seq = data.draw(st.sampled_from(sorted(self.live)))
        self.bm.release(seq, self.live.pop(seq)["table"])

    @invariant()
    def every_block_is_free_evictable_or_held_by_exactly_its_tables(self):
        bm = self.bm
        refs: dict[int, set[int]] = {}
        for seq, s in self.live.items():
            for b in s["table"]:
                refs.setdefault(b, set()).add(seq)
        assert {b: set(bm.owners(b)) for b in refs} == refs
        free, evictable = set(bm._free), set(bm._evictable)
        assert not (free & evictable) and not (free & refs.keys()) and not (evictable & refs.keys())
        assert len(free) + len(evictable) + len(refs) == bm.num_blocks
        assert evictable <= set(bm._key_of) and not (free & set(bm._key_of))
        assert {bm._block_of[k] for k in bm._key_of.values()} == set(bm._key_of)


TestPrefixCache = PrefixCacheMachine.TestCase
TestPrefixCache.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


def _shared_prompts(n, prefix_len=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(1, 256, (prefix_len,), generator=g).tolist()
    return [system + torch.randint(1, 256, (int(k),), generator=g).tolist() for k in torch.randint(2, 12, (n,), generator=g)]


@pytest.mark.parametrize("kv_cache_tokens", [4096, 160], ids=["roomy", "preempting"])
def test_same_greedy_tokens_with_and_without_prefix_caching(llama, kv_cache_tokens):
    prompts = _shared_prompts(12)
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    kw = dict(progress=False, block_size=8, max_batch_tokens=64, kv_cache_tokens=kv_cache_tokens)
    plain = Generator(llama, **kw).generate_batched(prompts, sp)
    gen = Generator(llama, prefix_caching=True, **kw)
    cached = gen.generate_batched(prompts, sp)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    assert gen.blocks.hit_tokens > 0 and sum(o.metrics.cached_tokens for o in cached) > 0
    assert gen.blocks.num_free == gen.blocks.num_blocks  # every block is free or evictable again
    if kv_cache_tokens == 160:
        assert gen.stats.preemptions > 0
    else:  # no request admitted twice: the cache's hits are the requests' cached tokens, whole blocks of prompt
        assert gen.blocks.hit_tokens == sum(o.metrics.cached_tokens for o in cached)
        assert gen.blocks.query_tokens == sum(len(p) for p in prompts)
        assert all(o.metrics.cached_tokens % 8 == 0 for o in cached)


def test_cached_tokens_counts_only_prompt_tokens_after_a_preemption(llama):
    """A request preempted after it generated a block's worth of tokens is readmitted with those tokens' blocks
    cached too; ``cached_tokens`` counts prompt tokens (as documented), never more than the prompt."""
    gen = Generator(llama, progress=False, prefix_caching=True, block_size=4, kv_cache_tokens=4096)
    rid = gen.add_request([5, 6, 7], SamplingParams(max_new_tokens=12, ignore_eos=True))
    events = []
    while len(gen._seqs[rid].output_ids) < 9:
        events += gen.step()
    seq = gen._seqs[rid]
    gen.scheduler._preempt(seq)  # as the scheduler does when the cache runs out
    while gen.has_unfinished():
        events += gen.step()
    out = events[-1].output
    assert out.metrics.num_preemptions == 1 and len(out.token_ids) == 12
    assert 0 < out.metrics.cached_tokens <= out.metrics.prompt_tokens == 3


def test_prefix_cache_saves_prefill_and_keys_on_the_adapter(llama):
    from llmspeed import lora

    prompts = _shared_prompts(6, prefix_len=64, seed=1)
    gen = Generator(llama, progress=False, prefix_caching=True, block_size=16)
    gen.generate_batched(prompts[:1], SamplingParams(max_new_tokens=2))  # warms the cache with the system prompt
    before = gen.num_tokens_computed
    gen.generate_batched(prompts[1:], SamplingParams(max_new_tokens=2))
    computed = gen.num_tokens_computed - before
    assert computed < sum(len(p) for p in prompts[1:]) - 4 * 64  # the 64 shared tokens are not recomputed
    lora.add_adapter(llama, "a", r=2)
    lora.set_adapter(llama, None)
    gen = Generator(llama, progress=False, prefix_caching=True, block_size=16)
    gen.generate_batched(prompts[:1], SamplingParams(max_new_tokens=2))
    out = gen.generate_batched(prompts[1:2], SamplingParams(max_new_tokens=2, adapter="a"))[0]
    assert out.metrics.cached_tokens == 0  # blocks computed without the adapter are not reused with it


def test_prefix_cache_tells_apart_adapters_that_share_a_name_and_follows_set_adapter(llama):
    """Regression: blocks were keyed by the adapter's name only, so a prompt run with adapter "a", then with a new
    adapter added as "a", or without an adapter after set_adapter changed the active one, reused keys/values
    the old adapter computed (the generator's tokens then differed from a fresh generator's)."""
    from llmspeed import lora

    def add(name, seed):
        lora.add_adapter(llama, name, r=2)
        with torch.no_grad():
            for _, layer in lora.lora_layers(llama):
                if name in layer.lora_A:
                    layer.weight_b(name).normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))

    def run(gen, adapter):
        return gen.generate_batched(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True, adapter=adapter))[0]

    prompt = _shared_prompts(1, prefix_len=48, seed=2)
    add("a", 1)
    gen = Generator(llama, progress=False, prefix_caching=True, block_size=16)
    run(gen, "a")
    assert run(gen, "a").metrics.cached_tokens > 0  # the same adapter reuses its blocks
    lora.delete_adapter(llama, "a")
    add("a", 2)
    out = run(gen, "a")
    assert out.metrics.cached_tokens == 0 and out.token_ids == run(Generator(llama, progress=False), "a").token_ids
    lora.set_adapter(llama, "a")
    run(gen, None)  # blocks computed with the active adapter "a"
    lora.set_adapter(llama, None)
    out = run(gen, None)
    assert out.metrics.cached_tokens == 0 and out.token_ids == run(Generator(llama, progress=False), None).token_ids


def test_a_queued_request_without_an_adapter_is_keyed_by_the_adapter_active_when_it_runs(llama):
    """Regression: a request naming no adapter had its prefix-cache key fixed when it was added, so after
    set_adapter changed the active adapter while it was queued it reused blocks of the adapter active at add time
    (and registered its own, computed with the new one, under the old adapter's key)."""
    from llmspeed import lora

    for name, seed in (("a", 1), ("b", 2)):
        lora.add_adapter(llama, name, r=2)
        with torch.no_grad():
            for _, layer in lora.lora_layers(llama):
                if name in layer.lora_A:
                    layer.weight_b(name).normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    prompt = _shared_prompts(1, prefix_len=48, seed=3)[0]
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)

    def fresh(active):
        lora.set_adapter(llama, active)
        return Generator(llama, progress=False).generate_batched([prompt], sp)[0].token_ids

    want_a, want_b = fresh("a"), fresh("b")
    assert want_a != want_b  # the adapters tell apart
    lora.set_adapter(llama, "a")
    gen = Generator(llama, progress=False, prefix_caching=True, block_size=16)
    assert gen.generate_batched([prompt], sp)[0].token_ids == want_a  # blocks computed with "a"
    rid = gen.add_request(prompt, sp)  # queued while "a" is active ...
    lora.set_adapter(llama, "b")  # ... and runs with "b": it must not take "a"'s blocks
    outs = {}
    while gen.has_unfinished():
        for event in gen.step():
            if event.finished:
                outs[event.request_id] = event.output
    assert outs[rid].token_ids == want_b and outs[rid].metrics.cached_tokens == 0
    lora.set_adapter(llama, "a")  # and "a" must not find the blocks "b" computed under its key
    assert gen.generate_batched([prompt], sp)[0].token_ids == want_a


def test_reset_prefix_cache_keeps_a_running_requests_blocks_from_later_requests(llama):
    """Regression: ``reset_prefix_cache`` (docs/serving.md: call it after changing weights) forgot only the blocks
    nobody held, so a request added after it took the blocks a still running request held: keys and values of the
    old weights (its tokens then differed from a fresh generator's)."""
    prompt = _shared_prompts(1, prefix_len=32, seed=4)[0]
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    gen = Generator(llama, progress=False, prefix_caching=True, block_size=8)
    gen.add_request(prompt, SamplingParams(max_new_tokens=50, ignore_eos=True))
    gen.step()  # its prompt's blocks are computed and registered, and it holds them
    assert gen.blocks.num_cached > 0
    for name, weight in llama.hf.named_parameters():
        if "mlp" in name or "self_attn" in name:
            weight.data.mul_(1.7)  # through .data: no version counter sees it
    gen.blocks.reset_prefix_cache()
    out = gen.generate_batched([prompt], sp)[0]
    assert out.metrics.cached_tokens == 0
    assert out.token_ids == Generator(llama, progress=False).generate_batched([prompt], sp)[0].token_ids


def _scale_in_place(model):
    with torch.no_grad():
        for name, weight in model.hf.named_parameters():
            if "mlp" in name or "self_attn" in name:
                weight.mul_(1.7)


def _load_scaled(model):
    model.hf.load_state_dict({k: v * 1.7 if "mlp" in k else v for k, v in model.hf.state_dict().items()})


def _quantize(model):
    from llmspeed import quantize

    quantize(model, "int8")


@pytest.mark.parametrize("change", [_scale_in_place, _load_scaled, _quantize])
def test_prefix_cache_is_not_reused_after_the_model_changed(llama, change):
    """Regression: a Generator's prefix cache was keyed by tokens and adapter only, so after the model changed under
    it (weights edited in place or loaded, quantized) a repeated prompt reused keys and values of the old model:
    its logprobs (and tokens) differed from a fresh generator's."""
    prompt = _shared_prompts(1, prefix_len=32, seed=5)
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=0)
    gen = Generator(llama, progress=False, prefix_caching=True, block_size=8)
    gen.generate_batched(prompt, sp)
    assert gen.generate_batched(prompt, sp)[0].metrics.cached_tokens == 32  # unchanged: reused
    change(llama)
    out = gen.generate_batched(prompt, sp)[0]
    want = Generator(llama, progress=False).generate_batched(prompt, sp)[0]
    assert out.metrics.cached_tokens == 0
    assert out.token_ids == want.token_ids
    assert [lp.logprob for lp in out.logprobs] == [lp.logprob for lp in want.logprobs]
    assert gen.generate_batched(prompt, sp)[0].metrics.cached_tokens == 32  # cached again, under the new weights
