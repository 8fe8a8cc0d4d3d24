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


def test_too_few_requests_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="requests must be at least 2.*got 1"):
        serving.run(parts=("online",), requests=1)
