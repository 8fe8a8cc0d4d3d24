"""The LoRA suite's pieces on a tiny random model: numbers that mean something, baselines named.

(``run`` only adds one subprocess per training configuration around ``train_config``, so that each
peak memory is its own; spawning three interpreters would triple this test's time.)
"""

from __future__ import annotations

import pytest

import llmspeed
from llmspeed.bench import lora as suite

SETTINGS = suite._settings(quick=True, tiny=True)


def test_train_config_measures_a_qlora_run():
    r = suite.train_config("qlora-int4-g64", "tiny-llama", "cpu", SETTINGS)
    assert r["steps_per_s"] > 0 and r["peak_mb"] >= r["rss_before_mb"] > 0
    # rank r on every linear of the 2 decoder layers: r * (in + out) per layer
    llama = llmspeed.models.tiny("llama", seed=0)
    shapes = [m for n, m in llama.linear_layers() if n != "lm_head"]
    assert r["trainable"] == SETTINGS["r"] * sum(m.in_features + m.out_features for m in shapes)
    full = suite.train_config("full-fp32", "tiny-llama", "cpu", SETTINGS)
    assert full["trainable"] == sum(p.numel() for p in llama.hf.parameters())
    assert full["weights_mb"] == pytest.approx(4 * full["trainable"] / 2**20, rel=0.01)  # fp32 bytes, in MiB
    assert r["weights_mb"] < full["weights_mb"] / 1.5  # packed int4 linears; the embedding stays fp32


def test_inference_and_interop_tables():
    inference = suite.inference_rows("tiny-llama", "cpu", SETTINGS, progress=False)
    assert {r["phase"] for r in inference} == {"decode", "prefill"}
    for r in inference:  # each ratio is this row's time over its baseline row's time, in the same phase and batch
        base = next(b for b in inference if (b["phase"], b["batch"], b["variant"]) == (r["phase"], r["batch"], r["baseline"]))
        assert r["vs_baseline"] == pytest.approx(r["ms"] / base["ms"]), r
    assert {r["variant"] for r in inference} >= {"merged", "1 adapter, unmerged", "4 rows, 4 adapters, concat (one pass)"}
    interop = suite.interop_rows("tiny-llama", "cpu", SETTINGS, False)
    assert len(interop) == 2
    for r in interop:  # the same logits through both libraries, and logits that are not all zero
        assert r["within_1e-4"] and r["max_abs_logit_diff"] <= 1e-4 < r["max_abs_logit"], r
