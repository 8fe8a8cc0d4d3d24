"""``prompt_logprobs`` (vLLM's): every prompt token's log-probability given the tokens before it, equal to transformers'
own forward pass, whatever the chunking, the prefix cache, the batch beside it or a preemption."""

from __future__ import annotations

import pytest
import torch

from llmspeed import Generator, SamplingParams
from llmspeed.generation.prompt_logprobs import prompt_rows
from llmspeed.generation.scheduler import Batch, Chunk
from llmspeed.generation.sequence import Sequence

PROMPT = [5, 9, 11, 3, 7, 21, 2, 8, 13, 40, 41]


def _reference(llama, prompt):
    with torch.inference_mode():
        return torch.log_softmax(llama.hf(torch.tensor([prompt])).logits[0].float(), -1)  # [P, V]


def _check(llama, prompt, entries, k):
    ref = _reference(llama, prompt)
    assert len(entries) == len(prompt) and entries[0] is None
    for j in range(1, len(prompt)):
        e = entries[j]
        assert e.token_id == prompt[j] and e.logprob == pytest.approx(float(ref[j - 1, prompt[j]]), abs=1e-4)
        assert [t for t, _ in e.top] == ref[j - 1].topk(k).indices.tolist()


@pytest.mark.parametrize("max_batch_tokens", [4, 5, 64])
def test_prompt_logprobs_equal_transformers_forward_in_any_chunking(llama, max_batch_tokens):
    gen = Generator(llama, progress=False, max_batch_tokens=max_batch_tokens)
    other = [1, 2, 3, 4, 5, 6]
    outs = gen.generate_batched([PROMPT, other], [SamplingParams(max_new_tokens=4, prompt_logprobs=3, logprobs=1),
                                                  SamplingParams(max_new_tokens=4)])  # fmt: skip
    _check(llama, PROMPT, outs[0].prompt_logprobs, 3)
    assert outs[1].prompt_logprobs is None  # the request beside it did not ask
    alone = Generator(llama, progress=False).generate_batched([PROMPT], SamplingParams(max_new_tokens=4))[0]
    assert outs[0].token_ids == alone.token_ids  # generation itself is unchanged


def test_a_cached_prefix_is_not_used_until_the_prompt_logprobs_are_in(llama):
    gen = Generator(llama, progress=False, prefix_caching=True, block_size=4)
    first = gen.generate_batched([PROMPT], SamplingParams(max_new_tokens=2))[0]
    again = gen.generate_batched([PROMPT], SamplingParams(max_new_tokens=2, prompt_logprobs=0))[0]
    assert again.metrics.cached_tokens == 0 and again.token_ids == first.token_ids
    _check(llama, PROMPT, again.prompt_logprobs, 0)
    plain = gen.generate_batched([PROMPT], SamplingParams(max_new_tokens=2))[0]
    assert plain.metrics.cached_tokens > 0  # its blocks were still registered for the requests after it


def test_a_preempted_request_records_each_prompt_token_once():
    """Rows of a chunk: only the prompt positions whose next token's entry is missing (a recompute after a
    preemption skips those it has), never the last prompt position (the sampler's) nor an output token's."""
    seq = Sequence(0, list(PROMPT), SamplingParams(prompt_logprobs=1))
    seq.prompt_logprobs = {1: "kept", 2: "kept"}
    other = Sequence(1, [1, 2, 3], SamplingParams())
    batch = Batch([Chunk(other, 0, 3), Chunk(seq, 0, 5)])
    assert [(j, row) for _, j, row in prompt_rows(batch)] == [(3, 5), (4, 6), (5, 7)]
    seq.output_ids = [99, 98]  # readmitted after a preemption: prompt + outputs recomputed in one chunk
    batch = Batch([Chunk(seq, 8, 5)])
    assert [(j, row) for _, j, row in prompt_rows(batch)] == [(9, 0), (10, 1)]
    seq.prompt_logprobs.update({j: "kept" for j in range(3, len(PROMPT))})
    assert not seq.needs_prompt_logprobs and prompt_rows(batch) == []


def test_a_one_token_prompt_has_only_the_first_entry(llama):
    out = Generator(llama, progress=False).generate_batched([[7]], SamplingParams(max_new_tokens=2, prompt_logprobs=2))[0]
    assert out.prompt_logprobs == [None]


@pytest.mark.parametrize("value", [-1, 21, True, 1.0, "2"])
def test_a_bad_prompt_logprobs_is_refused_naming_it(value):
    with pytest.raises(ValueError, match="`prompt_logprobs` must be None or an integer from 0 to 20"):
        SamplingParams(prompt_logprobs=value)


def test_prompt_logprobs_follow_each_requests_adapter(llama):
    """Two requests in one batch, one through adapter "a" and one on the base: each prompt's entries are its own
    model's (the rows of a LoRA output head include the prompt rows)."""
    from llmspeed import lora
    from tests.generation.conftest import random_adapter

    random_adapter(llama, "a", seed=3)
    sp = SamplingParams(max_new_tokens=2, prompt_logprobs=1)
    outs = Generator(llama, progress=False).generate_batched([PROMPT, PROMPT], [
        SamplingParams(max_new_tokens=2, prompt_logprobs=1, adapter="a"), sp])  # fmt: skip
    _check(llama, PROMPT, outs[1].prompt_logprobs, 1)  # the base (no adapter is active)
    lora.set_adapter(llama, "a")
    _check(llama, PROMPT, outs[0].prompt_logprobs, 1)
    assert outs[0].prompt_logprobs[3].logprob != outs[1].prompt_logprobs[3].logprob


def test_prompt_logprobs_survive_preemption_in_a_cache_too_small_for_the_batch(llama):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 200, (n,), generator=g).tolist() for n in (30, 25, 28, 22)]
    gen = Generator(llama, progress=False, kv_cache_tokens=96, block_size=4, max_batch_tokens=16, prefix_caching=True)
    outs = gen.generate_batched(prompts, SamplingParams(max_new_tokens=20, prompt_logprobs=1, ignore_eos=True))
    assert sum(o.metrics.num_preemptions for o in outs) > 0  # the case under test happened
    for prompt, out in zip(prompts, outs):
        _check(llama, prompt, out.prompt_logprobs, 1)
