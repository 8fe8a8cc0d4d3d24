"""logprobs, min_tokens and penalties, checked against transformers' own generate and logits processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmspeed import Generator, SamplingParams
from llmspeed.generation.sampler import _penalize, filter_logits, sample_batch
from llmspeed.generation.sampling import RowContext
from llmspeed.generation.sequence import Sequence


def _hf(model, prompt, n, **kwargs):
    with torch.inference_mode():
        out = model.hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                                output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[0, len(prompt):].tolist(), out


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(llama, penalty):
    prompt = [5, 9, 5, 9, 5, 9, 12]
    ref, _ = _hf(llama, prompt, 12, repetition_penalty=penalty, eos_token_id=None)
    out = Generator(llama, progress=False).generate_batched(
        [prompt], SamplingParams(max_new_tokens=12, ignore_eos=True, repetition_penalty=penalty))[0]
    plain = Generator(llama, progress=False).generate_batched([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == ref and out.token_ids != plain.token_ids


def test_penalized_rows_equal_the_transformers_processor():
    logits = torch.randn(2, 40)
    prompt, output = [1, 2, 3], [3, 4, 4]
    rows = [RowContext(prompt, output), RowContext()]
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams()]
    tokens, _ = sample_batch(logits, params, [None, None], rows)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + output]), logits[:1].clone())
    assert tokens == [int(expected.argmax()), int(logits[1].argmax())]
    # presence / frequency (OpenAI): logit - count * frequency - (count > 0) * presence
    sp = SamplingParams(presence_penalty=0.5, frequency_penalty=1.0)
    boosted = logits[:1].clone()
    boosted[0, 4] = boosted.max() + 1.2  # token 4 leads by 1.2; two uses cost it 2.5
    tokens, _ = sample_batch(boosted, [sp], [None], [RowContext((), [4, 4])])
    manual = boosted[0].clone()
    manual[4] -= 2 * 1.0 + 0.5
    assert tokens == [int(manual.argmax())] and tokens != [4]


def test_min_tokens_matches_transformers_min_new_tokens(llama):
    prompt = [5, 6, 7]
    free = Generator(llama, progress=False).generate_batched([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    eos = free.token_ids[1]  # make the second greedy token an end-of-sequence token
    gen = Generator(llama, progress=False, eos_token_ids=[eos])
    early = gen.generate_batched([prompt], SamplingParams(max_new_tokens=8))[0]
    assert early.finish_reason == "stop" and len(early.token_ids) == 2
    held = gen.generate_batched([prompt], SamplingParams(max_new_tokens=8, min_tokens=5))[0]
    ref, _ = _hf(llama, prompt, 8, min_new_tokens=5, eos_token_id=eos)
    assert held.token_ids == ref[: len(held.token_ids)] and len(held.token_ids) >= 5
    assert eos not in held.token_ids[:5]


def test_logprobs_are_the_models_log_softmax(llama):
    prompt = [3, 1, 4, 1, 5]
    ref, hf = _hf(llama, prompt, 5, eos_token_id=None)
    out = Generator(llama, progress=False).generate_batched(
        [prompt], SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=3))[0]
    assert out.token_ids == ref and len(out.logprobs) == 5
    for lp, scores in zip(out.logprobs, hf.scores):
        want = torch.log_softmax(scores[0].float(), -1)
        top = want.topk(3)
        assert lp.logprob == pytest.approx(float(want[lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    events = list(Generator(llama, progress=False).stream([prompt], SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=0)))
    assert all(e.logprobs is not None and e.logprobs.top == () for e in events)


@pytest.mark.parametrize(
    "kwargs, arg",
    [(dict(logprobs=21), "logprobs"), (dict(min_tokens=9, max_new_tokens=8), "min_tokens"),
     (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=2.5), "presence_penalty"),
     (dict(frequency_penalty="1"), "frequency_penalty")],
)
def test_new_params_are_validated(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        SamplingParams(**kwargs)


def test_batched_top_k_top_p_rows_match_one_row_at_a_time():
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    params = [SamplingParams(temperature=0.7, top_k=k, top_p=p, seed=i)
              for i, (k, p) in enumerate([(0, 1.0), (5, 1.0), (0, 0.5), (20, 0.9), (1, 1.0)])]

    def gens():
        return [torch.Generator().manual_seed(p.seed) for p in params]

    batch, _ = sample_batch(logits, params, gens())
    single = [sample_batch(logits[i : i + 1], [p], [g])[0][0] for i, (p, g) in enumerate(zip(params, gens()))]
    assert batch == single
    assert batch[4] == int(logits[4].argmax())  # top_k=1 is greedy


def test_a_top_k_past_int64_keeps_every_token_and_fails_no_other_row():
    """Regression: ``top_k=10**20`` (valid: an int >= 0) went into an int64 tensor and raised "Overflow when
    unpacking long long" in ``sample_batch``, failing every request of the step, not only its own."""
    torch.manual_seed(0)
    logits = torch.randn(2, 300)
    params = [SamplingParams(temperature=0.7, top_k=10**20, seed=1), SamplingParams(temperature=0.7, top_k=5, seed=2)]
    same = [SamplingParams(temperature=0.7, top_k=0, seed=1), params[1]]

    def gens():
        return [torch.Generator().manual_seed(p.seed) for p in params]

    assert sample_batch(logits, params, gens())[0] == sample_batch(logits, same, gens())[0]
    assert torch.equal(filter_logits(logits[0], 10**20, 1.0), logits[0])


def test_a_stop_token_id_past_the_vocabulary_under_min_tokens_fails_no_request(llama):
    """Regression: ``stop_token_ids`` (and ``eos_token_ids``) are valid at any id >= 0, but before ``min_tokens``
    they are banned by indexing the logits row, so an id past the vocabulary raised IndexError in the sampler
    and failed every request of the step, not only its own."""
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    far = SamplingParams(max_new_tokens=4, min_tokens=2, ignore_eos=True, stop_token_ids=[10**6])
    prompts = [[1, 2, 3], [4, 5, 6]]
    outs = Generator(llama, progress=False).generate_batched(prompts, [sp, far])
    alone = Generator(llama, progress=False).generate_batched(prompts, sp)
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    eos = Generator(llama, progress=False, eos_token_ids=[10**6]).generate_batched(prompts, SamplingParams(max_new_tokens=4, min_tokens=1))
    assert [o.finish_reason for o in eos] == ["length", "length"]


def test_logprobs_past_the_vocabulary_list_every_token_and_fail_no_other_row():
    """Regression: ``logprobs=20`` (valid) on a vocabulary of fewer than 20 tokens asked ``topk`` for more values
    than the row has; it raised "selected index k out of range" in ``sample_batch`` and failed every request of
    the step, not only its own."""
    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    tokens, lps = sample_batch(logits, [SamplingParams(logprobs=20), SamplingParams()], [None, None])
    assert tokens == logits.argmax(-1).tolist() and lps[1] is None
    want = torch.log_softmax(logits[0], -1).sort(descending=True)
    assert [t for t, _ in lps[0].top] == want.indices.tolist()
    assert [v for _, v in lps[0].top] == pytest.approx(want.values.tolist())


def test_temperature_top_k_top_p_match_the_transformers_warpers_on_random_logits():
    """Golden: temperature, then top-k, then top-p keep exactly the tokens (and logits) transformers' warpers keep,
    and a sampled row follows the softmax of what they leave."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = torch.randn(1, 50, generator=gen) * 3
        k = int(torch.randint(0, 60, (), generator=gen))
        p = float(torch.rand((), generator=gen)) * 0.99 + 0.01
        t = 0.2 + 1.5 * float(torch.rand((), generator=gen))
        ref = TemperatureLogitsWarper(t)(None, x.clone())
        ref = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, ref) if k else ref)[0]
        ours = filter_logits(x[0] / t, k, p)
        assert torch.equal(ours.isfinite(), ref.isfinite()) and torch.equal(ours[ours.isfinite()], ref[ref.isfinite()])
    x = torch.randn(1, 8, generator=gen) * 2
    sp = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, seed=3)
    want = torch.softmax(TopPLogitsWarper(0.8)(None, TopKLogitsWarper(5)(None, x / 0.7))[0], -1)
    rng = torch.Generator().manual_seed(3)
    counts = torch.bincount(torch.tensor([sample_batch(x, [sp], [rng])[0][0] for _ in range(3000)]), minlength=8)
    assert torch.allclose(counts / 3000, want, atol=0.03) and bool((counts[want == 0] == 0).all())


def test_penalties_match_the_transformers_processor_and_openai_formula_on_random_logits():
    """Golden: the repetition penalty is transformers' over prompt + output; presence and frequency penalties are
    OpenAI's (``logit - count * frequency - (count > 0) * presence``) over the output only."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        x = torch.randn(1, 40, generator=gen) * 3
        prompt = torch.randint(0, 40, (6,), generator=gen).tolist()
        output = torch.randint(0, 40, (5,), generator=gen).tolist()
        rp = float(torch.empty(()).uniform_(0.5, 2.0, generator=gen))
        ours = _penalize(x, [SamplingParams(repetition_penalty=rp)], [RowContext(prompt, output)])
        ref = RepetitionPenaltyLogitsProcessor(rp)(torch.tensor([prompt + output]), x.clone())
        assert torch.allclose(ours, ref)
        sp = SamplingParams(presence_penalty=0.6, frequency_penalty=-0.4)
        ours = _penalize(x, [sp], [RowContext(prompt, output)])
        counts = torch.bincount(torch.tensor(output), minlength=40).float()
        assert torch.allclose(ours[0], x[0] - 0.6 * (counts > 0).float() + 0.4 * counts)


def test_an_extreme_repetition_penalty_keeps_ties_at_the_top_sampled_evenly():
    # regression: a penalty of 1e-40 divided the seen tokens' positive logits to +inf; a row with two +inf has no
    # softmax, and every sample took the first of them
    logits = torch.tensor([[3.0, 2.0, -1.0, 0.5, 2.5]])
    params = SamplingParams(repetition_penalty=1e-40, temperature=1.0, seed=0)
    penalized = _penalize(logits, [params], [RowContext([0, 1, 2])])
    assert torch.isfinite(penalized).all() and penalized[0, 0] == penalized[0, 1] == torch.finfo(torch.float32).max
    tokens = [sample_batch(logits, [params], [torch.Generator().manual_seed(s)], [RowContext([0, 1, 2])])[0][0]
              for s in range(40)]
    assert set(tokens) == {0, 1} and 8 <= tokens.count(1) <= 32
    assert _penalize(torch.tensor([[float("-inf"), 1.0]]), [params], [RowContext([0])])[0, 0] == float("-inf")


def test_logprobs_are_the_raw_distribution_whatever_penalties_temperature_and_filters_do():
    """The documented contract: logprobs come from the raw logits (vLLM's default), not from the penalized,
    temperature-scaled, top-k / top-p filtered scores the token is picked from. (The greedy golden test above
    cannot tell the two apart: without penalties and sampling they are the same row.)"""
    torch.manual_seed(0)
    logits = torch.randn(3, 30) * 2
    params = [SamplingParams(temperature=0.5, top_k=3, top_p=0.6, seed=1, logprobs=5),
              SamplingParams(repetition_penalty=1.8, presence_penalty=1.5, logprobs=5),
              SamplingParams(temperature=1.3, seed=2, min_tokens=1, logprobs=5)]
    top5 = logits.topk(5, dim=-1).indices
    rows = [RowContext(), RowContext(top5[1, :3].tolist(), top5[1, :2].tolist()), RowContext(banned=top5[2, :2].tolist())]
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    tokens, lps = sample_batch(logits, params, gens, rows)
    want = torch.log_softmax(logits, -1)
    for i, lp in enumerate(lps):
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(float(want[i, tokens[i]]), abs=1e-5)
        assert [t for t, _ in lp.top] == want[i].topk(5).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(want[i].topk(5).values.tolist(), abs=1e-5)


def test_each_row_gets_as_many_alternatives_as_it_asked_for():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(logprobs=2), SamplingParams(logprobs=5), SamplingParams(logprobs=0)]
    _, logprobs = sample_batch(logits, params, [None] * 3)
    assert [len(lp.top) for lp in logprobs] == [2, 5, 0]
    assert [t for t, _ in logprobs[0].top] == logits[0].topk(2).indices.tolist()


def test_min_tokens_bans_end_of_sequence_only_when_it_would_end_the_request():
    """vLLM: before min_tokens the stop token ids are banned, and EOS too unless ignore_eos (then it ends nothing)."""
    eos = frozenset({2})
    for ignore_eos, banned in ((False, (5, 2)), (True, (5,))):
        seq = Sequence(0, [1], SamplingParams(min_tokens=2, stop_token_ids=(5,), ignore_eos=ignore_eos))
        assert seq.row_context(eos).banned == banned
        seq.output_ids += [3, 3]
        assert seq.row_context(eos).banned == ()
