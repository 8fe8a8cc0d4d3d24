"""The Generator's requests that cannot run: bad prompts and arguments are refused or fail alone, never run as
something else."""

from __future__ import annotations

import pytest
import torch

from llmspeed import Generator, SamplingParams
from tests.generation.conftest import ChatTokenizer, _ids, _prompts


def test_bad_request_fails_alone(llama):
    ok = _prompts(3, seed=3)
    too_long = list(range(1, 200)) * 3  # 597 tokens > max_position_embeddings 512
    over_budget = list(range(1, 101))  # fits the model but not a 64-token KV budget
    gen = Generator(llama, progress=False, kv_cache_tokens=96, block_size=16)
    outs = gen.generate_batched([ok[0], too_long, ok[1], over_budget, ok[2]], SamplingParams(max_new_tokens=5))
    assert [o.index for o in outs] == [0, 1, 2, 3, 4]
    assert outs[1].finish_reason == "error" and "context" in outs[1].error
    assert outs[3].finish_reason == "error" and "KV cache" in outs[3].error
    alone = Generator(llama, progress=False).generate_batched([ok[0], ok[1], ok[2]], SamplingParams(max_new_tokens=5))
    assert [outs[i].token_ids for i in (0, 2, 4)] == _ids(alone)
    assert all(outs[i].error is None for i in (0, 2, 4))


def test_empty_list_and_argument_errors(llama):
    gen = Generator(llama, progress=False)
    assert gen.generate_batched([]) == []
    assert list(gen.stream([])) == []
    for run in (gen.generate_batched, lambda p, s: list(gen.stream(p, s))):  # regression: unchecked with no prompts
        with pytest.raises(TypeError, match="sampling must be a SamplingParams"):
            run([], "greedy")
        with pytest.raises(ValueError, match=r"one per prompt \(0\); got 2"):
            run([], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="one per prompt"):
        gen.generate_batched([[1, 2]], [SamplingParams(), SamplingParams()])
    for prompts in ("hello", "", b""):  # regression: the empty string or bytes ran as no prompts and returned []
        for run in (gen.generate_batched, lambda p: list(gen.stream(p))):
            with pytest.raises(TypeError, match="single string"):
                run(prompts)
    with pytest.raises(TypeError, match=r"single list of token ids \[1, 2, 3\]"):
        gen.generate_batched([1, 2, 3])
    with pytest.raises(TypeError, match="sampling must be a SamplingParams .*; got int"):
        gen.generate_batched([[1, 2]], 5)
    assert gen.num_live == 0
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        Generator(llama, kv_cache_tokens=4, block_size=16)
    for kwargs, message in [
        (dict(max_batch_tokens=2.5), "max_batch_tokens must be an int; got 2.5"),
        (dict(block_size=8.5), "block_size must be an int; got 8.5"),
        (dict(max_seqs="4"), "max_seqs must be an int; got '4'"),
        (dict(kv_cache_tokens="16"), "kv_cache_tokens must be None or an int; got '16'"),
        (dict(block_size=0), "block_size must be >= 1; got 0"),  # not a ZeroDivisionError sizing the cache
        (dict(num_scheduler_steps=0), "num_scheduler_steps must be an int >= 1; got 0"),
        (dict(kv_cache_bytes=100), r"kv_cache_bytes must hold at least one block \(\d+ bytes\); got 100"),
        (dict(eos_token_ids=3), "eos_token_ids must be None or a list of token ids >= 0; got 3"),
        (dict(eos_token_ids=[-5]), r"eos_token_ids must be None or a list of token ids >= 0; got \[-5\]"),
        (dict(chat_template="yes"), "chat_template must be True or False; got 'yes'"),
        (dict(progress="no"), "progress must be True or False; got 'no'"),
        (dict(cuda_graphs=0), "cuda_graphs must be True or False; got 0"),
        (dict(fused_decode=1), "fused_decode must be None, True or False; got 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            Generator(llama, **kwargs)
    assert Generator(llama, progress=False, eos_token_ids=(t for t in [7])).eos_token_ids == {7}
    for model in ("smollm2", llama.module):  # a name or a bare nn.Module: say what a model must be
        with pytest.raises(TypeError, match="model must be an llmspeed.Model"):
            Generator(model)
    out = gen.generate_batched([[1, 300]])[0]
    assert out.finish_reason == "error" and "[0, 256)" in out.error


def test_token_ids_must_be_integers_not_truncated_floats(llama):
    gen = Generator(llama, progress=False)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    outs = gen.generate_batched([[1.5, 2.7], torch.tensor([1.0, 2.0]), torch.tensor([1, 2]), [1, 2]], sp)
    for out in outs[:2]:
        assert out.finish_reason == "error" and "must be integers" in out.error and out.token_ids == []
    assert outs[2].token_ids == outs[3].token_ids and outs[2].prompt_token_ids == [1, 2]


def test_a_single_tensor_or_array_of_token_ids_is_refused_as_prompts_not_run_per_token(llama):
    """A 1-D tensor / NumPy array (or a list of NumPy ints) given as ``prompts`` is one prompt's ids, refused as a plain
    list of ids is, not run as one failing request per element."""
    import numpy as np

    gen = Generator(llama, progress=False)
    for ids in (torch.tensor([1, 2, 3]), np.array([1, 2, 3]), [np.int64(1), np.int64(2), np.int64(3)]):
        with pytest.raises(TypeError, match=r"single list of token ids \[1, 2, 3\]"):
            gen.generate_batched(ids)
        with pytest.raises(TypeError, match="wrap it in a list"):
            list(gen.stream(ids))
    assert gen.num_live == 0 and not gen.has_unfinished()
    outs = gen.generate_batched(torch.tensor([[1, 2, 3]]), SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert outs[0].prompt_token_ids == [1, 2, 3] and outs[0].finish_reason == "length"  # rows of a 2-D batch: prompts


def test_prompts_may_be_any_iterable_read_once(llama):
    """A generator of prompts (as transformers' pipelines take) gives what the same list gives; a non-iterable
    is a TypeError naming prompts, not len()'s."""
    gen = Generator(llama, progress=False)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5]]
    assert _ids(gen.generate_batched((p for p in prompts), sp)) == _ids(gen.generate_batched(prompts, sp))
    assert [e.token_id for e in gen.stream(iter(prompts), sp)] == [e.token_id for e in gen.stream(prompts, sp)]
    assert llama.generate_batched(iter(prompts), sp, progress=False)[1].prompt_token_ids == [4, 5]
    with pytest.raises(TypeError, match="prompts must be a list \\(or iterable\\) of prompts; got int"):
        gen.generate_batched(5)
    assert gen.num_live == 0


def test_bytes_prompts_are_refused_not_read_as_token_ids(llama):
    gen = Generator(llama, progress=False)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    outs = gen.generate_batched([b"hello", bytearray(b"hi"), [1, 2]], sp)
    for out in outs[:2]:
        assert out.finish_reason == "error" and out.token_ids == [] and out.prompt_token_ids == []
        assert "got bytes" in out.error and "decode" in out.error
    assert outs[2].finish_reason == "length"
    with pytest.raises(TypeError, match="single string, bytes or chat"):
        gen.generate_batched(b"hello")
    assert gen.num_live == 0


def test_a_chat_prompt_the_template_cannot_render_fails_alone(llama):
    llama.tokenizer = ChatTokenizer()
    gen = Generator(llama, progress=False)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    bad = [{"role": "user"}]
    outs = gen.generate_batched([[1, 2, 3], bad, [{"role": "user", "content": "hi"}]], sp)
    assert [o.index for o in outs] == [0, 1, 2] and bad == [{"role": "user"}]
    assert outs[1].finish_reason == "error" and "chat template" in outs[1].error and "KeyError" in outs[1].error
    alone = Generator(llama, progress=False).generate_batched([[1, 2, 3], [104, 105]], sp)
    assert [outs[0].token_ids, outs[2].token_ids] == _ids(alone)
    assert gen.num_live == 0 and not gen.has_unfinished()


def test_stop_strings_without_a_tokenizer_fail_alone_not_silently_ignored(llama):
    """Regression: a model without a tokenizer has no text, so its requests' stop strings were never searched:
    ``stop=[...]`` was silently ignored and the request ran to ``max_new_tokens`` with ``finish_reason="length"``."""
    assert llama.tokenizer is None
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    outs = Generator(llama, progress=False).generate_batched(
        [[1, 2, 3], [4, 5, 6]], [sp, SamplingParams(max_new_tokens=4, ignore_eos=True, stop=["\n"])])
    assert outs[1].finish_reason == "error" and "tokenizer" in outs[1].error and outs[1].token_ids == []
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 4
