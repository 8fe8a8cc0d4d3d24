"""``logit_bias`` and ``min_p``: checked against transformers' processors and against the model's own logits, on every
path a request's tokens can take (the sampler, the fused CPU step, greedy bursts), with bad values refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, SequenceBiasLogitsProcessor

from llmspeed import Generator, SamplingParams
from llmspeed.generation import fused_decode
from llmspeed.generation.categorical import min_p_rows
from llmspeed.generation.sampler import sample_batch


def test_logit_bias_is_kept_as_pairs_in_id_order_whatever_form_it_is_given_in():
    given = SamplingParams(logit_bias={9: -1.5, np.int64(2): 3})
    assert given.logit_bias == ((2, 3.0), (9, -1.5)) and all(type(t) is int for t, _ in given.logit_bias)
    assert SamplingParams(logit_bias=[(9, -1.5), (2, 3.0)]) == given  # pairs too; equal params hash alike
    assert hash(SamplingParams(logit_bias={2: 3.0, 9: -1.5})) == hash(given)
    assert SamplingParams().logit_bias == () and not SamplingParams().penalized and given.penalized
    assert SamplingParams(logit_bias=None).logit_bias == ()  # vLLM's default spelling of "no bias"


@pytest.mark.parametrize("bias", [{-1: 1.0}, {1.5: 1.0}, {True: 1.0}, {"5": 1.0}, {5: float("nan")}, {5: float("inf")},
                                  {5: "1"}, {5: None}, [(1, 1.0), (1, 2.0)], [(1, 1.0, 2.0)], 5, "x"])
def test_a_bad_logit_bias_is_refused_naming_it_and_the_value(bias):
    with pytest.raises(ValueError, match="`logit_bias` must map token ids") as err:
        SamplingParams(logit_bias=bias)
    assert repr(bias) in str(err.value)


@pytest.mark.parametrize("min_p", [-0.1, 1.5, float("nan"), "0.1", True])
def test_a_bad_min_p_is_refused_naming_it(min_p):
    with pytest.raises(ValueError, match="`min_p` must be a number from 0 to 1"):
        SamplingParams(min_p=min_p)


def test_min_p_keeps_exactly_what_the_transformers_warper_keeps_on_random_logits():
    """Golden: after the temperature, ``min_p`` drops the tokens transformers' ``MinPLogitsWarper`` drops."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = torch.randn(3, 50, generator=gen) * 3  # [3, 50]
        ps = [float(torch.rand((), generator=gen)) for _ in range(3)]
        ours = min_p_rows(x, ps)
        for row, p in enumerate(ps):
            ref = MinPLogitsWarper(p)(None, x[row : row + 1].clone())[0]
            assert torch.equal(ours[row].isfinite(), ref.isfinite())
            assert torch.equal(ours[row][ours[row].isfinite()], x[row][ref.isfinite()])
    assert min_p_rows(x, [0.0, 0.0, 0.0]) is x  # off: the rows as they were, no copy


def test_a_min_p_row_samples_only_tokens_above_its_floor_and_leaves_other_rows_alone():
    x = torch.tensor([[2.0, 1.8, 0.5, 0.0, -1.0], [2.0, 1.8, 0.5, 0.0, -1.0]])  # [2, 5]
    floored = SamplingParams(temperature=1.0, min_p=0.5, seed=1)  # keeps p >= 0.5 p_max: the first two tokens
    free = SamplingParams(temperature=1.0, seed=1)
    rngs = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    seen = [set(), set()]
    for _ in range(400):
        tokens, _ = sample_batch(x, [floored, free], rngs)
        for row, token in enumerate(tokens):
            seen[row].add(token)
    assert seen[0] == {0, 1} and seen[1] == {0, 1, 2, 3, 4}
    kept = torch.softmax(x[0, :2], -1)
    counts = torch.bincount(torch.tensor([sample_batch(x[:1], [floored], [rngs[0]])[0][0] for _ in range(2000)]),
                            minlength=2)  # fmt: skip
    assert torch.allclose(counts.float() / 2000, kept, atol=0.04)  # the kept tokens' softmax, renormalized


def test_logit_bias_equals_the_transformers_processor_before_the_penalties():
    """Golden: a bias is added as transformers' ``SequenceBiasLogitsProcessor`` adds a one-token sequence bias, and
    before the repetition penalty (vLLM's order): a biased logit is then divided or multiplied by the penalty."""
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3))  # [1, 40]
    bias = {int(logits.argmax()): -4.0, 7: 2.5}
    ref = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(torch.tensor([[1, 2]]), logits.clone())
    _, lp = sample_batch(logits, [SamplingParams(logit_bias=bias, logprobs=0)], [None])
    tokens, _ = sample_batch(logits, [SamplingParams(logit_bias=bias)], [None])
    assert tokens == [int(ref.argmax())] and tokens != [int(logits.argmax())]
    assert lp[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[tokens[0]]))  # logprobs stay raw


def _biased_greedy(llama, prompt, n, ban, **gen_kwargs):
    """Greedy tokens of ``prompt`` with ``ban`` (ids) biased by -100, computed from the model's own logits."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = llama.hf(torch.tensor([ids])).logits[0, -1].float()  # [V]
            logits[list(ban)] -= 100.0
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("path", ["generic", "fused", "bursts"])
def test_a_biased_greedy_request_follows_the_biased_logits_on_every_path(llama, path):
    """Regression guard: greedy decode loops that take the model's argmax themselves (the fused CPU step's C++ loop,
    greedy bursts) must not run a request whose logits a bias changes."""
    if path != "generic" and fused_decode.unavailable() is not None:
        pytest.skip(f"the C++ decode kernel cannot build here: {fused_decode.unavailable()}")
    prompt = [5, 9, 11, 3]
    kwargs = dict(progress=False, fused_decode=path != "generic", num_scheduler_steps=4 if path == "bursts" else 1)
    first = Generator(llama, **kwargs)
    plain = first.generate_batched([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    wanted = {"generic": "decode", "fused": "fused cpu", "bursts": "fused cpu, greedy burst"}[path]
    assert wanted in first.step_paths  # the path under test is the one an unbiased request takes
    ban = set(plain.token_ids[:2])
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True, logit_bias={t: -100.0 for t in ban})
    gen = Generator(llama, **kwargs)
    outs = gen.generate_batched([prompt, prompt], [sp, SamplingParams(max_new_tokens=6, ignore_eos=True)])
    assert "fused cpu, greedy burst" not in gen.step_paths  # a biased row keeps the batch out of the argmax loop
    assert outs[0].token_ids == _biased_greedy(llama, prompt, 6, ban) and not ban & set(outs[0].token_ids)
    assert outs[1].token_ids == plain.token_ids  # the request beside it is not biased
    forced = Generator(llama, **kwargs).generate_batched([prompt], SamplingParams(max_new_tokens=5, ignore_eos=True,
                                                                                 logit_bias={17: 100.0}))[0]  # fmt: skip
    assert forced.token_ids == [17] * 5


def test_a_logit_bias_id_past_the_vocabulary_ends_that_request_with_an_error_only(llama):
    vocab = llama.spec.vocab_size
    outs = Generator(llama, progress=False).generate_batched(
        [[5, 6], [5, 6]], [SamplingParams(max_new_tokens=3, logit_bias={vocab: 1.0}), SamplingParams(max_new_tokens=3)])
    assert outs[0].finish_reason == "error" and f"below the vocabulary size {vocab}" in outs[0].error
    assert outs[0].token_ids == [] and outs[1].finish_reason in ("length", "stop") and outs[1].token_ids
