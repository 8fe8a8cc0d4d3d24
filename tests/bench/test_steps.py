"""``decode_step_ms``: decode steps timed one by one, bursts of ``num_scheduler_steps`` counted per step."""

from __future__ import annotations

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
