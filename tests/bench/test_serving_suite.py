"""The serving suite's online part: how many arrivals each offered rate gets, and bad input."""

import pytest

from llmspeed.bench import serving


def test_requests_sets_the_arrivals_per_rate_and_each_rate_feeds_both_systems(monkeypatch):
    seen = []
    monkeypatch.setattr(serving, "load_model", lambda *a, **k: type("M", (), {"tokenizer": None, "hf": None})())
    monkeypatch.setattr(serving, "make_workload", lambda tok, n, **k: (list(range(n)), [1] * n))

    def fake(system):
        def online(model, prompts, lengths, times, rate, **kwargs):
            seen.append((system, rate, len(prompts), len(times)))
            return {"table": "online load", "system": system, "offered_req_s": rate, "sustained": rate < 2}

        return online

    monkeypatch.setattr(serving, "online_transformers", fake("transformers continuous batching"))
    monkeypatch.setattr(serving, "online_llmspeed", fake("llmspeed Engine"))
    rows = serving.run(parts=("online",), rates=(1.0, 3.0), requests=7)
    assert seen == [("transformers continuous batching", 1.0, 7, 7), ("llmspeed Engine", 1.0, 7, 7),
                    ("transformers continuous batching", 3.0, 7, 7), ("llmspeed Engine", 3.0, 7, 7)]
    summary = [r for r in rows if r["table"] == "online load, summary"]
    assert [r["highest_rate_with_p99_ttft_under_2s"] for r in summary] == [1.0, 1.0]


def test_bad_load_or_parts_are_refused_naming_the_argument_before_the_model_loads(monkeypatch):
    """Regression: a rate of 0 died in the arrivals, a negative rate gave arrivals before the start, requests=2.5 a
    TypeError, rates=() ran the defaults, and an unknown part name ran nothing at all."""
    monkeypatch.setattr(serving, "load_model", lambda *a: pytest.fail("the model loaded before the check"))
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match=f"requests must be an int of at least 2 .*got {bad}"):
            serving.run(parts=("online",), requests=bad)
    for bad in ((), (0.0,), (-1.0, 2.0), "2"):
        with pytest.raises(ValueError, match=r"rates must be positive numbers \(requests per second\) or None; got"):
            serving.run(parts=("online",), rates=bad)
    for bad in (("onlin",), "online"):
        with pytest.raises(ValueError, match=r"parts must be a tuple of \['online', 'prefix', 'repeated', 'soak'\]"):
            serving.run(parts=bad)


def test_prefix_hit_rate_is_the_timed_runs_not_the_warm_ups_too():
    # the warm-up request's lookups (all misses) were counted in: 0.64 where the timed run served 0.8 from the cache
    import llmspeed

    class Tokenizer:  # what prefix_rows and the generator ask of one: ids of the text, text of ids
        eos_token_id = None

        def __init__(self, vocab):
            self.vocab = vocab

        def encode(self, text, **kwargs):
            return [(7 * i + 3) % self.vocab for i in range(4000)]

        def decode(self, ids, **kwargs):
            return " ".join(map(str, ids))

    model = llmspeed.models.tiny("llama", seed=0)
    model.tokenizer = Tokenizer(model.spec.vocab_size)
    uncached, cached = serving.prefix_rows(model, n=4, system_tokens=64, question_tokens=16, new_tokens=2)
    assert uncached["hit_rate"] == 0.0
    assert cached["prefill_tokens_computed"] == 4 * 16  # each question; the shared prompt from the cache
    assert cached["hit_rate"] == round(1 - cached["prefill_tokens_computed"] / cached["prompt_tokens"], 3) == 0.8
