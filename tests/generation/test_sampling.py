"""SamplingParams validation and the per-request sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmspeed.generation.sampler import argmax_rows, filter_logits, sample
from llmspeed.generation.sampling import SamplingParams, request_generator, sampling_list


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=-3), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(stop=None), "stop"),
        (dict(stop=3), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=None), "stop_token_ids"),
        (dict(ignore_eos="yes"), "ignore_eos"),
        (dict(adapter=""), "adapter"),
    ],
)
def test_invalid_params_raise_naming_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        SamplingParams(**kwargs)


def test_stop_string_and_lists_are_normalised_to_tuples():
    p = SamplingParams(stop="###", stop_token_ids=[3, 4])
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4)
    hash(p)  # frozen and hashable


def test_greedy_rows_are_argmax():
    logits = torch.randn(4, 50)
    tokens = sample(logits, [SamplingParams()] * 4, [None] * 4)
    assert tokens == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(3, 100)
    for p in (SamplingParams(temperature=1.0, top_k=1, seed=0), SamplingParams(temperature=1.0, top_p=1e-6, seed=0)):
        gens = [request_generator(p, torch.device("cpu")) for _ in range(3)]
        assert sample(logits, [p] * 3, gens) == logits.argmax(-1).tolist()


def test_filter_logits_applies_a_top_p_just_under_one_as_the_sampler_does():
    """Regression: filter_logits stored top_p in fp32, where 1 - 1e-8 rounds to 1 and turned top-p off, while the
    engine's sampler (float64 parameters) applies it and drops a token whose more likely tokens hold that mass."""
    logits = torch.tensor([0.0, -30.0])  # the second token's probability is 9e-14
    assert filter_logits(logits, 0, 1 - 1e-8).isfinite().tolist() == [True, False]
    assert filter_logits(logits, 0, 1.0).isfinite().tolist() == [True, True]


def test_filter_logits_keeps_exactly_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_logits(logits, 0, 0.7).isfinite().tolist()
    assert kept == [True, True, False, False]
    assert filter_logits(logits, 3, 1.0).isfinite().tolist() == [True, True, True, False]


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=123)
    row = torch.randn(1, 64)
    alone = sample(row, [p], [request_generator(p, torch.device("cpu"))])
    others = torch.randn(5, 64)
    batch = torch.cat([others[:2], row, others[2:]])  # [6, 64]
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(2)] + [p] + [SamplingParams()] * 3
    gens = [request_generator(q, torch.device("cpu")) for q in params]
    assert sample(batch, params, gens)[2] == alone[0]


def test_seeds_that_differ_above_bit_32_give_different_streams_on_the_cpu():
    """Regression: torch's CPU generator keeps the low 32 bits of a seed, so ``seed=1`` and ``seed=2**32 + 1`` (both
    documented as valid) drew the very same tokens."""
    cpu = torch.device("cpu")

    def draws(seed):
        return torch.rand(8, generator=request_generator(SamplingParams(temperature=1.0, seed=seed), cpu)).tolist()

    assert draws(1) != draws(2**32 + 1) and draws(2**32 + 1) != draws(2**33 + 1)
    assert draws(2**32 + 1) == draws(2**32 + 1) and draws(2**64 - 1) == draws(2**64 - 1)  # still reproducible
    assert draws(7) == torch.rand(8, generator=torch.Generator().manual_seed(7)).tolist()  # below 2**32: as before


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    p = SamplingParams(temperature=1.0, seed=7)
    gen = request_generator(p, torch.device("cpu"))
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[sample(probs.log()[None], [p], [gen])[0]] += 1
    assert torch.allclose(counts / 2000, probs, atol=0.04)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
               elements=st.sampled_from([0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan"), -0.0]))
)  # fmt: skip
def test_argmax_rows_matches_torch_on_ties_infinities_and_nans(rows):
    scores = torch.from_numpy(rows)
    assert torch.equal(argmax_rows(scores), scores.argmax(dim=-1))
    assert torch.equal(argmax_rows(scores.T.contiguous().T), scores.argmax(dim=-1))  # a strided view too
    assert argmax_rows(scores).dtype == torch.long


def test_argmax_rows_leaves_other_dtypes_to_torch():
    scores = torch.tensor([[1.0, 3.0, 3.0], [float("nan"), 0.0, 5.0]], dtype=torch.bfloat16)
    assert argmax_rows(scores).tolist() == [1, 0]


def test_numpy_numbers_are_accepted_as_python_ones_and_reals_past_float_range_refused():
    """Regression: ``SamplingParams(max_new_tokens=np.int64(5))`` raised "`max_new_tokens` must be an integer >= 1;
    got np.int64(5)" (an integer, as prompts' NumPy token ids are), and ``temperature=10**400`` (past float's
    range) was accepted, then failed every request of its step with an OverflowError in the sampler."""
    p = SamplingParams(max_new_tokens=np.int64(5), top_k=np.int32(3), seed=np.uint64(2**63), temperature=np.float32(0.5),
                       top_p=np.float16(0.5), stop_token_ids=[np.int64(7)], min_tokens=np.int8(1))
    assert (p.max_new_tokens, p.top_k, p.seed, p.temperature, p.top_p, p.stop_token_ids) == (5, 3, 2**63, 0.5, 0.5, (7,))
    assert all(type(v) is int for v in (p.max_new_tokens, p.top_k, p.seed, p.min_tokens, *p.stop_token_ids))
    assert SamplingParams(stop_token_ids=np.int64(4)).stop_token_ids == (4,)
    for kwargs, arg in ((dict(temperature=10**400), "temperature"), (dict(repetition_penalty=10**400), "repetition_penalty"),
                        (dict(presence_penalty=-(10**400)), "presence_penalty"), (dict(top_k=np.bool_(True)), "top_k")):
        with pytest.raises(ValueError, match=f"`{arg}`"):
            SamplingParams(**kwargs)


def test_greedy_is_below_1e_5_and_a_nucleus_stops_once_it_reaches_top_p():
    """vLLM's bound: temperature 1e-5 itself samples. A token whose more likely tokens already reach top_p is dropped
    (transformers' TopPLogitsWarper drops it too)."""
    assert SamplingParams(temperature=0.99e-5).greedy and not SamplingParams(temperature=1e-5).greedy
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert filter_logits(logits, 0, 0.5).isfinite().tolist() == [True, False, False]


def test_temperature_sharpens_the_sampled_distribution():
    logits = torch.tensor([[0.0, 1.0]])
    p = SamplingParams(temperature=0.5, seed=0)
    gen = request_generator(p, torch.device("cpu"))
    ones = sum(sample(logits, [p], [gen])[0] for _ in range(2000)) / 2000
    assert abs(ones - torch.softmax(logits[0] / 0.5, -1)[1].item()) < 0.03  # 0.88; at temperature 1 it is 0.73


def test_one_sampling_params_per_prompt_must_match_the_prompt_count():
    assert sampling_list({"max_new_tokens": 3}, 2) == [SamplingParams(max_new_tokens=3)] * 2
    with pytest.raises(ValueError, match=r"one per prompt \(3\); got 2"):
        sampling_list([SamplingParams()] * 2, 3)


def test_a_mixed_batch_samples_each_random_row_as_alone_and_greedy_rows_take_the_argmax():
    """Greedy, top-k, top-p, plain and penalized rows in one call: each random row gets the token it gets alone (one
    draw of its generator), each greedy row its argmax; and the random rows do sample (not all argmax)."""
    from llmspeed.generation.sampler import sample_ids
    from llmspeed.generation.sampling import RowContext

    cpu = torch.device("cpu")
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 0.5  # flat: the argmax is rarely drawn
    rows = [RowContext()] * 5 + [RowContext(prompt_ids=[1], output_ids=[2, 2])]
    hits = 0
    for seed in range(20):
        params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=20, seed=seed), SamplingParams(),
                  SamplingParams(temperature=0.9, top_p=0.8, seed=seed), SamplingParams(temperature=1.2, seed=seed),
                  SamplingParams(temperature=1.0, repetition_penalty=1.5, frequency_penalty=0.5, seed=seed)]  # fmt: skip
        together = sample_ids(logits, params, [request_generator(p, cpu) for p in params], rows).tolist()
        for i, p in enumerate(params):
            alone = sample_ids(logits[i : i + 1], [p], [request_generator(p, cpu)], rows[i : i + 1]).tolist()
            assert together[i] == alone[0], (seed, i)
        assert together[0] == int(logits[0].argmax()) and together[2] == int(logits[2].argmax())
        hits += sum(together[i] != int(logits[i].argmax()) for i in (1, 3, 4, 5))
    assert hits > 40  # of 80 draws, most land off the argmax of a flat row


def test_a_temperature_past_float32s_range_never_draws_a_banned_token():
    """Regression: SamplingParams accepts any finite temperature, but 1e39 became inf in the fp32 temperatures, a
    banned token's -inf / inf a NaN, and the row's NaN made it take its argmax: the banned token (end-of-sequence
    before min_tokens) every time. Such a temperature samples (nearly) uniformly among the allowed tokens."""
    from llmspeed.generation.sampler import sample_batch
    from llmspeed.generation.sampling import RowContext

    cpu = torch.device("cpu")
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]]).expand(60, -1)
    for t in (1e39, 1e300):
        params = [SamplingParams(temperature=t, seed=s) for s in range(60)]
        tokens = sample_batch(logits, params, [request_generator(p, cpu) for p in params], [RowContext(banned=[0])] * 60)[0]
        assert 0 not in tokens and set(tokens) == {1, 2, 3}
