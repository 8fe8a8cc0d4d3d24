"""The lora_decode suite's table on a tiny model, its decode steps faked: each ratio is against the same batch of the
model without adapters, in the same kind of step, from the medians over the repetitions."""

from __future__ import annotations

import itertools
import statistics

import pytest

from llmspeed import lora
from llmspeed.bench import lora_decode as suite


def test_each_ratio_is_to_the_same_batch_without_adapters_in_the_same_step(monkeypatch):
    reps: dict[tuple, itertools.cycle] = {}

    def ms_of(model, names, fused, dtype):
        """A step's time: grows with the rows, the adapters used, the LoRA wrapper; the generic path is slower."""
        wrapped = bool(list(lora.lora_layers(model)))
        per_row = 1.0 + wrapped + sum(n is not None for n in names) + 3 * (len(lora.adapter_names(model)) > 4)
        return per_row * len(names) * (3.0 if fused is False else 1.0) * (1.25 if dtype == "float32" else 1.0)

    def fake(model, prompts, steps, names, fused, lora_dtype="float16"):
        assert len(prompts) == len(names) and steps == 8
        key = (id(model), tuple(names), fused, lora_dtype)
        factor = next(reps.setdefault(key, itertools.cycle([1.0, 4.0, 1.5])))  # the repetitions' noise: median 1.5
        return ms_of(model, names, fused, lora_dtype) * factor, "generic" if fused is False else "fused cpu"

    monkeypatch.setattr(suite, "decode_step_ms", fake)
    rows = suite.run(model="tiny-llama", quick=True, rank=2)
    agreement = [r for r in rows if r["table"].startswith("greedy tokens")]
    assert [r["step"] for r in agreement] == list(suite.STEPS)
    table = [r for r in rows if r["table"] == "int4 decode step, r=2 adapters"]
    assert [(r["step"], r["config"]) for r in table] == list(itertools.product(suite.STEPS, suite.CONFIGS))
    ms = {(r["step"], r["config"]): r["ms"] for r in table}
    for r in table:
        batch = r["config"].split(",")[0]
        assert r["path"] == ("generic" if r["step"] == "generic" else "fused cpu")
        base = ms[(r["step"], f"{batch}, {suite.PLAIN}")]
        assert r["vs model without adapters"] == pytest.approx(r["ms"] / base, rel=5e-3), r  # of the rounded ms
    # the medians over the 3 repetitions (1.5x), not their mean (2.17x): batch 8 of the plain model, fp32 stacks
    assert ms[("fused, fp32 stacks", f"batch 8, {suite.PLAIN}")] == statistics.median([10.0, 40.0, 15.0])
    # each configuration ran on its own model: the one with 16 adapters costs more than the one with 4
    assert ms[("fused, fp16 stacks", "batch 1, one adapter of 16 on the model")] == 1.5 * 6.0
    assert ms[("fused, fp16 stacks", "batch 1, one adapter")] == 1.5 * 3.0
    assert ms[("generic", "batch 8, 4 adapters over the rows")] == 1.5 * (2 + 7) * 8 * 3  # 7 of 8 rows, an adapter each
