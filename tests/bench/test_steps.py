"""``decode_step_ms``: decode steps timed one by one, bursts of ``num_scheduler_steps`` counted per step."""

from __future__ import annotations

import pytest

import llmspeed
from llmspeed.bench.steps import decode_step_ms


def test_bursts_count_as_their_steps_and_report_their_path(monkeypatch):
    model = llmspeed.models.tiny("llama", seed=0)
    calls = []
    step = llmspeed.Generator.step

    def counted(self):
        calls.append(self.num_scheduler_steps)
        return step(self)

    monkeypatch.setattr(llmspeed.Generator, "step", counted)
    ms, paths = decode_step_ms(model, [[1, 2, 3], [4, 5]], 10, scheduler_steps=4)
    assert ms > 0 and paths == "fused cpu,fused cpu, greedy burst"
    # a prefill call, then 10 steps in calls of 4 (one fused step and a burst of 3): 3 timed calls
    assert calls == [4] * 4
    calls.clear()
    ms, paths = decode_step_ms(model, [[1, 2, 3], [4, 5]], 10)
    assert ms > 0 and paths == "fused cpu" and len(calls) == 11


def test_the_median_is_over_the_steps_asked_for_each_burst_split_into_its_steps(monkeypatch):
    """6 steps in calls of 4: the second call's 4 steps count for 2 of the 6 (the median is not over 8)."""
    from types import SimpleNamespace

    import llmspeed.bench.steps as steps_module

    clock = iter([0.0, 0.004, 1.0, 1.4])  # the two timed calls take 4 and 400 ms: steps of 1 and 100 ms
    monkeypatch.setattr(steps_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    ms, _ = decode_step_ms(llmspeed.models.tiny("llama", seed=0), [[1, 2, 3], [4, 5]], 6, scheduler_steps=4)
    # [1] * 4 + [100] * 2: the median of the 6 steps is 1 ms (of all 8 samples it would be 50.5)
    assert ms == pytest.approx(1.0)
