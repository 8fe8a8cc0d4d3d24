"""The LoRA suite's pieces on a tiny random model: numbers that mean something, baselines named.

(``run`` only adds one subprocess per training configuration around ``train_config``, so that each
peak memory is its own; spawning three interpreters would triple this test's time.)
"""

from __future__ import annotations

from llmspeed.bench import lora as suite

SETTINGS = suite._settings(quick=True, tiny=True)


def test_train_config_measures_a_qlora_run():
    r = suite.train_config("qlora-int4-g64", "tiny-llama", "cpu", SETTINGS)
    assert r["steps_per_s"] > 0 and r["peak_mb"] >= r["rss_before_mb"] > 0
    assert 0 < r["trainable"] and r["weights_mb"] > 0
    full = suite.train_config("full-fp32", "tiny-llama", "cpu", SETTINGS)
    assert r["trainable"] < full["trainable"] / 5
    assert r["weights_mb"] < full["weights_mb"]


def test_inference_and_interop_tables():
    inference = suite.inference_rows("tiny-llama", "cpu", SETTINGS, progress=False)
    assert {r["phase"] for r in inference} == {"decode", "prefill"}
    assert all(r["ms"] > 0 and r["vs_baseline"] > 0 for r in inference)
    assert {r["variant"] for r in inference} >= {"merged", "1 adapter, unmerged", "4 rows, 4 adapters, concat (one pass)"}
    interop = suite.interop_rows("tiny-llama", "cpu", SETTINGS)
    assert len(interop) == 2 and all(r["within_1e-4"] for r in interop)
