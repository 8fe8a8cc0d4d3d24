"""The sampler's random rows (:mod:`llmspeed.generation.categorical`): exact samples of the filtered softmax from one
uniform number a row, the nucleus found without a full sort, rows independent of each other."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llmspeed.generation.categorical import _invert, filter_rows, nucleus_weights, sample_rows


def _gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.8), (2, 1.0), (3, 0.9)])
def test_samples_follow_the_filtered_softmax(top_k, top_p):
    """20,000 draws of one 7-token row: each token's frequency within 5 standard deviations of its probability under
    filter_rows' softmax, and no dropped token ever drawn."""
    logits = torch.tensor([[2.0, 1.5, 0.3, 1.5, 1.9, -3.0, 0.0]])  # top_k=3: the 3rd largest ties with the 4th
    n = 20_000
    rows = logits.expand(n, -1).contiguous()
    tokens = sample_rows(rows, [top_k] * n, [top_p] * n, _gens(n))
    probs = torch.softmax(filter_rows(logits, torch.tensor([top_k]), torch.tensor([top_p])), -1)[0].double()  # [7]
    counts = torch.bincount(tokens, minlength=7).double()
    for tok in range(7):
        expect = n * probs[tok]
        sigma = math.sqrt(max(n * probs[tok] * (1 - probs[tok]), 1e-12))
        assert abs(counts[tok] - expect) <= 5 * sigma, (tok, counts[tok], expect)
    assert counts[probs == 0].sum() == 0


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.sampled_from([5, 64, 300, 1500, 5000]),
    scale=st.sampled_from([0.3, 1.0, 3.0, 8.0]),
    top_p=st.sampled_from([0.05, 0.5, 0.9, 0.99]),
    seed=st.integers(0, 2**16),
)
def test_the_nucleus_is_the_one_a_full_sort_keeps(vocab, scale, top_p, seed):
    """The partial top-k passes (64, 256, 1024, ... candidates) keep exactly the tokens filter_rows keeps, for flat
    and peaked rows whose nucleus needs one pass or several."""
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed)) * scale  # [3, V]
    probs = torch.softmax(logits.double(), -1)
    ordered = probs.sort(-1, descending=True).values
    before = ordered.cumsum(-1) - ordered
    assume(bool(((before - top_p).abs() > 1e-5).all()))  # no token within rounding of the edge
    reference = filter_rows(logits, torch.zeros(3, dtype=torch.long), torch.full((3,), top_p)) > float("-inf")  # [3, V]
    weight = torch.exp(logits - logits.amax(-1, keepdim=True))  # [3, V]
    for partial in (True, False):  # passes of 64, 256, ... candidates (the CPU), or the whole row at once (a GPU)
        ids, kept = nucleus_weights(weight, [top_p] * 3, partial=partial)
        assert torch.equal(torch.zeros_like(reference).scatter(1, ids, kept > 0), reference)


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.sampled_from([8, 300, 5000]),
    ties=st.booleans(),
    ks=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_top_k_rows_draw_the_token_the_whole_masked_row_gives(vocab, ties, ks, seed):
    """A top-k row samples from its k largest logits alone on the CPU: with the same uniform it draws exactly the
    token the inverse of the whole filtered row's cumulative weights (vocabulary order) gives, also where logits
    tie with the k-th (those rows keep every tie, as filter_rows does); with top-p too, only tokens the filter
    keeps."""
    rows = len(ks)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2  # [R, V]
    if ties:
        logits = (logits * 2).round() / 2  # many logits equal: ties at the k-th value
    got = sample_rows(logits, ks, [1.0] * rows, _gens(rows, seed))
    kept = filter_rows(logits, torch.tensor(ks), torch.ones(rows))  # [R, V]
    weight = torch.exp(kept - kept.amax(-1, keepdim=True))  # [R, V]
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in _gens(rows, seed)])  # [R]
    assert got.tolist() == _invert(torch.cumsum(weight, -1, dtype=torch.float64), uniform).tolist()
    top_p = [0.5, 0.9, 1.0, 0.3, 0.99][:rows]
    nucleus = filter_rows(logits, torch.tensor(ks), torch.tensor(top_p))  # [R, V]
    drawn = sample_rows(logits, ks, top_p, _gens(rows, seed + 1))
    floor = nucleus.masked_fill(nucleus == float("-inf"), float("inf")).amin(-1)  # [R] the least logit kept
    assert (logits.gather(1, drawn[:, None])[:, 0] >= floor).all()  # a kept token (or one tied with the last kept)


def test_a_row_draws_one_number_of_its_own_generator_whatever_shares_the_batch():
    logits = torch.randn(4, 1000) * 2
    k, p = [0, 5, 0, 0], [1.0, 1.0, 0.9, 0.5]
    together = sample_rows(logits, k, p, _gens(4, 10))
    alone = [int(sample_rows(logits[i : i + 1], k[i : i + 1], p[i : i + 1], _gens(1, 10 + i))[0]) for i in range(4)]
    assert together.tolist() == alone
    gens = _gens(4, 10)
    sample_rows(logits, k, p, gens)
    assert [g.get_state().equal(h.get_state()) for g, h in zip(gens, _gens(4, 10))] == [False] * 4
    again = _gens(4, 10)
    for g in again:
        torch.rand(1, generator=g, dtype=torch.float64)  # one draw a row: the state after sample_rows
    assert all(g.get_state().equal(h.get_state()) for g, h in zip(gens, again))


def test_rows_with_nothing_to_sample_take_their_argmax():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[-inf, -inf, -inf], [0.0, nan, 1.0], [0.0, inf, 1.0], [0.0, 5.0, -inf]])
    tokens = sample_rows(logits, [0] * 4, [1.0] * 4, _gens(4))
    assert tokens[:3].tolist() == [0, 1, 1] and tokens[3] in (0, 1)


def test_the_inverse_never_picks_a_zero_weight_at_the_top_of_the_range():
    """u just below 1 (the largest double under 1) lands on the last token with weight, not past it on the zeros."""
    cdf = torch.tensor([[0.25, 0.5, 0.5, 1.0, 1.0, 1.0]])  # weights .25 .25 0 .5 0 0
    u = torch.tensor([1.0 - 2.0**-53], dtype=torch.float64)
    assert _invert(cdf, u).tolist() == [3]
    assert _invert(cdf, torch.tensor([0.0], dtype=torch.float64)).tolist() == [0]
    assert _invert(cdf, torch.tensor([0.5], dtype=torch.float64)).tolist() == [3]  # the zero weight at 2 skipped


def test_the_sampler_sends_its_host_lists_to_the_device_without_a_blocking_copy(monkeypatch):
    """Regression: sample_rows / sample_ids built their row indices, k's, p's and temperatures with
    ``torch.tensor(list, device=dev)``, a ``non_blocking=False`` copy that on CUDA synchronizes the stream (the host
    waits for the queued steps of a burst), contrary to sample_rows' docstring. Every host list now goes through
    host_tensor (a pinned, non-blocking copy); no ``torch.tensor`` on the path is given a device."""
    from llmspeed.generation.sampler import sample_ids
    from llmspeed.generation.sampling import RowContext, SamplingParams, request_generator

    real = torch.tensor

    def no_device(*args, **kwargs):
        assert kwargs.get("device") is None, "torch.tensor(..., device=...) copies with non_blocking=False"
        return real(*args, **kwargs)

    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=5, seed=1), SamplingParams(temperature=0.8, top_p=0.5, seed=2),
              SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, seed=3)]  # fmt: skip
    gens = [request_generator(p, torch.device("cpu")) for p in params]
    rows = [RowContext(), RowContext(banned=[0]), RowContext(), RowContext(prompt_ids=[1, 2], output_ids=[2, 3])]
    logits = torch.randn(4, 100)
    expect = sample_ids(logits, params, gens, rows)
    gens = [request_generator(p, torch.device("cpu")) for p in params]
    monkeypatch.setattr(torch, "tensor", no_device)
    assert torch.equal(sample_ids(logits, params, gens, rows), expect)


@pytest.mark.parametrize("top_p", [1.0, 1 - 1e-12])  # top-p keeps them all: its weights were float64 already
def test_tokens_far_below_the_top_one_keep_their_own_probability(monkeypatch, top_p):
    """Regression: the cumulative weights of a row without top-p were summed in fp32, where after a token of weight 1
    tokens of weight about exp(-17) (4e-8, under half of fp32's spacing at 1) adds nothing or a whole 1.2e-7: such
    tokens were never drawn or drawn three times too often. u placed inside each tail token's exact interval must
    draw that token."""
    logits = torch.tensor([[0.0] + [-17.0 - 0.1 * i for i in range(6)]])  # decreasing: the nucleus' order too
    w = torch.exp(logits[0]).double()
    cdf = w.cumsum(0)
    for tok in range(1, 7):
        u = float((cdf[tok - 1] + w[tok] / 2) / cdf[-1])  # the middle of the token's interval
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.full((1,), u, dtype=torch.float64))
        assert sample_rows(logits, [0], [top_p], [None]).tolist() == [tok], (tok, u)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (2, 1.0), (0, 0.99)])
def test_huge_scaled_logits_from_a_temperature_just_above_greedy_sample_the_tied_top(top_k, top_p):
    """Logits divided by a temperature of 1e-5 reach 1e6: the weights are taken relative to the row's peak (exp of
    the raw scaled logits would be inf), so two tied top tokens are each drawn about half the time, never the rest."""
    n = 400
    logits = (torch.tensor([[10.0, -3.0, 10.0, 9.99]]) / 1e-5).expand(n, -1).contiguous()  # [n, 4]
    tokens = sample_rows(logits, [top_k] * n, [top_p] * n, _gens(n))
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert counts[1] == counts[3] == 0 and 140 < counts[0] < 260, counts


@pytest.mark.parametrize("top_p, kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.7500001, 4)])
def test_a_token_whose_more_likely_tokens_hold_exactly_top_p_is_dropped(top_p, kept):
    """Four equal tokens: the mass before the i-th is exactly i/4, so top_p = i/4 keeps i tokens (filter_rows too)."""
    n = 400
    logits = torch.zeros(n, 4)
    tokens = sample_rows(logits, [0] * n, [top_p] * n, _gens(n))
    assert len(set(tokens.tolist())) == kept
    assert int(filter_rows(logits[:1], torch.tensor([0]), torch.tensor([top_p])).isfinite().sum()) == kept


def test_a_top_p_row_with_a_nan_stops_after_the_first_pass(monkeypatch):
    """Regression: a row holding a NaN (its argmax is taken anyway) never reached its mass, so the CPU's nucleus
    search ran every pass (64, 256, ... the whole vocabulary) before giving up on it."""
    import llmspeed.generation.categorical as categorical

    passes = []
    real = torch.topk
    monkeypatch.setattr(categorical.torch, "topk", lambda w, m, **kw: passes.append(m) or real(w, m, **kw))
    logits = torch.randn(2, 5000)
    logits[0, 3] = 50.0  # a peaked row: its nucleus is in the first pass
    logits[1, 7] = float("nan")
    tokens = sample_rows(logits, [0, 0], [0.5, 0.5], _gens(2))
    assert passes == [64] and tokens[1] == 7


@pytest.mark.parametrize("vocab", [7, 5000])  # the whole row in one pass, and a partial topk pass (64 of 5000)
def test_of_two_tied_tokens_at_the_nucleus_edge_the_lower_id_is_kept(vocab):
    """Which of two tied tokens a nucleus keeps was topk's order (no fixed order, another on a GPU than on the CPU);
    it is now the vocabulary's, as filter_rows' stable sort has it, on every pass."""
    logits = torch.full((1, vocab), -30.0)
    logits[0, [3, 5]] = 0.0  # two tokens of probability ~1/2 each: top_p 0.4 keeps one
    drawn = {int(sample_rows(logits, [0], [0.4], _gens(1, seed))[0]) for seed in range(20)}
    assert drawn == {3}
    assert (filter_rows(logits, torch.tensor([0]), torch.tensor([0.4])) > float("-inf")).nonzero()[:, 1].tolist() == [3]
