"""The weight_pages suite: two copies per format, one left in 4 KiB pages, the other moved, timed in turn."""

from __future__ import annotations

import os

import pytest

from llmspeed import huge_pages
from llmspeed.bench import weight_pages

needs_thp = pytest.mark.skipif(huge_pages.why_not() is not None, reason=f"no huge pages here: {huge_pages.why_not()}")


@needs_thp
def test_quick_run_times_both_copies_and_leaves_the_environment_as_it_was(monkeypatch):
    monkeypatch.setattr(weight_pages, "GEMV_MB", 4)
    monkeypatch.delenv(huge_pages.ENV, raising=False)
    models, settings = [], []
    real_model, real_steps = weight_pages._model, weight_pages.decode_step_ms

    def model(name, fmt, progress):
        models.append(real_model(name, fmt, progress))
        return models[-1]

    def steps(m, prompts, n):
        settings.append((id(m), os.environ.get(huge_pages.ENV)))
        return real_steps(m, prompts, n)

    monkeypatch.setattr(weight_pages, "_model", model)
    monkeypatch.setattr(weight_pages, "decode_step_ms", steps)
    rows = weight_pages.run(model="tiny-llama", quick=True, progress=False)
    decode = [r for r in rows if r["table"] == "decode step by page size"]
    assert [r["format"] for r in decode] == list(weight_pages.FORMATS)
    for r in decode:
        assert all(r[f"{w}, 2 MiB / 4 KiB"] > 0 for w in ("1 seq", "8 seqs", "prompt")), r
    plain = {id(m) for m in models[0::2]}
    assert {s for i, s in settings if i in plain} == {"0"}  # the 4 KiB copy's generators leave it in place
    assert {s for i, s in settings if i not in plain} == {None}
    assert huge_pages.ENV not in os.environ
    gemv = [r for r in rows if r["table"] == "fused fp32 GEMV over 96 MiB"]
    assert {(r["pages"], r["row loop"]) for r in gemv} == {(p, r) for p in ("4 KiB", "2 MiB") for r in ("prefetch", "stream")}
    assert all(r["GB/s"] > 0 for r in gemv)


def test_elsewhere_than_the_cpu_or_without_huge_pages_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="device='cuda'"):
        weight_pages.run(device="cuda", model="tiny-llama", quick=True, progress=False)
    monkeypatch.setenv(huge_pages.ENV, "0")
    with pytest.raises(RuntimeError, match="2 MiB pages cannot be used here: LLMSPEED_HUGE_PAGES=0"):
        weight_pages.run(model="tiny-llama", quick=True, progress=False)
