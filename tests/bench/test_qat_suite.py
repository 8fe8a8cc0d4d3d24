"""The QAT and training suites on a tiny random model: every row present, numbers that mean something."""

from __future__ import annotations

import pytest

from llmspeed.bench import qat as qat_suite
from llmspeed.bench import training as training_suite


@pytest.mark.slow
def test_qat_suite_rows_and_gap_columns():
    rows = qat_suite.run(model="tiny-llama", progress=False)
    variants = [r["variant"] for r in rows]
    assert variants[1] == "fp32 fine-tuned" and any("GPTQ" in v for v in variants)
    assert "fixed scales" in variants[-2] and "learned scales" in variants[-1]
    assert all(r["table"] == "qat/perplexity" and r["steps"] == 3 for r in rows)
    assert rows[-1]["seconds"] >= rows[-1]["prepare_seconds"] > 0
    assert rows[1]["final_train_loss"] > 0 and rows[-1]["final_train_loss"] > 0


def test_qat_settings_fit_the_cpu_budget():
    full = qat_suite.settings(quick=False, tiny=False)
    quick = qat_suite.settings(quick=True, tiny=False)
    assert full["precision"] == quick["precision"] == "bf16" and full["train"] == "linears" and full["steps"] == 40
    assert quick["steps"] * quick["batch_size"] < full["steps"] * full["batch_size"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_suite_measures_one_run(precision):
    s = training_suite.settings(quick=True, tiny=True)
    r = training_suite.train_one("lora", precision, "tiny-llama", "cpu", s)
    assert r["step_s"] > 0 and len(r["losses"]) == s["steps"] and r["skipped"] == 0
    assert r["peak_mb"] >= r["rss_before_mb"] > 0
