"""The mixed-steps suite: each format and case timed both ways, with the path the fused run took."""

from __future__ import annotations

import pytest

from llmspeed.bench import mixed_steps
from llmspeed.generation import fused_decode

needs_kernel = pytest.mark.skipif(fused_decode.extension() is None, reason="no C++ compiler: no fused step to time")


@needs_kernel
def test_quick_run_times_both_paths_for_every_case():
    rows = mixed_steps.run(model="tiny-llama", quick=True, progress=False)
    assert [(r["format"], r["running"], r["prompt tokens"]) for r in rows] == [
        (f, running, prompt) for f in ("fp32", "int8", "int4", "nf4") for running, prompt in ((0, 256), (8, 16))]
    defaults = {(r["format"], r["prompt tokens"]): r["default"] for r in rows}
    if fused_decode.default_max_rows() >= 24:  # no row-loop limit under 24 rows: every case runs fused
        assert set(defaults.values()) == {"fused"}
    for r in rows:
        assert r["per-layer ms"] > 0 and r["fused ms"] > 0
        # the ratio is of the unrounded medians; the ms columns are rounded to 0.1 ms (a tiny model's steps
        # take about a millisecond on a fast host, so the rounding bounds are what the ratio must lie in)
        g, f = r["per-layer ms"], r["fused ms"]
        assert (g - 0.05) / (f + 0.05) - 0.005 <= r["per-layer / fused"] <= (g + 0.05) / max(f - 0.05, 1e-9) + 0.005
        assert r["fused path"] == "fused cpu mixed"  # mixed=True forces the fused step: it must have run it


@needs_kernel
def test_the_timed_step_reports_its_own_path():
    model = mixed_steps.load_model("tiny-llama", "cpu")
    assert mixed_steps.step_ms(model, 2, 40, mixed=False)[1] == "mixed"
    assert mixed_steps.step_ms(model, 2, 40, mixed=True)[1] == "fused cpu mixed"


def test_the_timed_step_is_the_running_decodes_and_the_whole_new_prompt(monkeypatch):
    # 16 prompts of 100 tokens take 4 steps of 512 tokens: timed after two, the step was those prompts' chunks
    model = mixed_steps.load_model("tiny-llama", "cpu")
    computed = []
    step = mixed_steps.Generator.step

    def counted(self):
        before = self.num_tokens_computed
        events = step(self)
        computed.append((self.num_tokens_computed - before, len(self.scheduler.waiting)))
        return events

    monkeypatch.setattr(mixed_steps.Generator, "step", counted)
    mixed_steps.step_ms(model, 16, 480, mixed=False)
    assert computed[-1] == (16 + 480, 0)  # every running row decoding, the new prompt in one chunk, nothing left waiting
    assert computed[-2] == (16, 0)  # a decode step of the running ones before it


def test_it_refuses_a_gpu():
    with pytest.raises(ValueError, match="device='cuda'"):
        mixed_steps.run(device="cuda", model="tiny-llama", quick=True)
