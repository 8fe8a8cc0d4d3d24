"""The QAT and training suites on a tiny random model: every row present, numbers that mean something."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmspeed.bench import qat as qat_suite
from llmspeed.bench import training as training_suite
from llmspeed.precision import cpu_matmul
from llmspeed.training import amp, loop


def _random_token_ppl(m, text, s, windows):
    """Perplexity on fixed random tokens: the tiny model has no tokenizer, so the suite would report None."""
    ids = torch.randint(0, m.spec.vocab_size, (windows, 32), generator=torch.Generator().manual_seed(windows))
    with torch.no_grad():
        logits = m.hf(input_ids=ids).logits.float()  # [windows, 32, vocab]
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


@pytest.mark.slow
def test_qat_suite_rows_and_gap_columns(monkeypatch):
    monkeypatch.setattr(qat_suite, "_ppl", _random_token_ppl)
    runs = []
    finetune = qat_suite._finetune
    monkeypatch.setattr(qat_suite, "_finetune", lambda *a: runs.append(finetune(*a)) or runs[-1])
    rows = qat_suite.run(model="tiny-llama", progress=False)
    # the loss column is the mean of the run's last 10 losses (all 3 here); seconds are the row's own cost
    assert [rows[i]["final_train_loss"] for i in (1, 5, 6)] == [pytest.approx(sum(r.losses[-10:]) / len(r.losses[-10:]))
                                                                for r in runs]  # fmt: skip
    assert rows[1]["seconds"] == runs[0].seconds > 0 and rows[-1]["seconds"] > rows[-1]["prepare_seconds"]
    variants = [r["variant"] for r in rows]
    assert variants[1] == "fp32 fine-tuned" and any("GPTQ" in v for v in variants)
    assert "learned scales" in variants[-1] and len(rows) == 7
    assert [("hadamard *_proj" in v) for v in variants[3:]] == [False, True, False, True]  # GPTQ x2, QAT x2
    assert all(r["table"] == "qat/perplexity" and r["steps"] == 3 for r in rows)
    assert rows[-1]["seconds"] >= rows[-1]["prepare_seconds"] > 0
    assert rows[1]["final_train_loss"] > 0 and rows[-1]["final_train_loss"] > 0
    tuned, gptq = rows[1], rows[3]
    for row in rows:  # every ratio column is computed against the fp32 fine-tuned row
        for key in ("ppl_domain", "ppl_license"):
            assert row[f"{key}_vs_tuned_%"] == pytest.approx(100 * (row[key] / tuned[key] - 1)), (row, key)
    assert tuned["ppl_domain_vs_tuned_%"] == 0
    for row in rows[4:]:  # QAT rows: the share of the GPTQ gap they close
        for key in ("ppl_domain", "ppl_license"):  # (gptq - row) / (gptq - float)
            expected = 100 * (gptq[key] - row[key]) / (gptq[key] - tuned[key])
            assert row[f"{key}_gap_closed_%"] == pytest.approx(expected), (row, key)


def test_qat_settings_fit_the_cpu_budget():
    full = qat_suite.settings(quick=False, tiny=False)
    quick = qat_suite.settings(quick=True, tiny=False)
    assert full["precision"] == quick["precision"] == "bf16" and full["train"] == "linears" and full["steps"] == 40
    assert quick["steps"] * quick["batch_size"] < full["steps"] * full["batch_size"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16 native"])
def test_training_suite_measures_one_run(precision, monkeypatch):
    made = []
    monkeypatch.setattr(cpu_matmul, "crossover", lambda dtype: 4)  # a CPU without fast bf16 GEMM
    monkeypatch.setattr(amp.MixedPrecision, "__post_init__", _recording(amp.MixedPrecision.__post_init__, made))
    s = training_suite.settings(quick=True, tiny=True)
    r = training_suite.train_one("lora", precision, "tiny-llama", "cpu", s)
    assert r["step_s"] > 0 and len(r["losses"]) == s["steps"] and r["skipped"] == 0
    assert r["peak_mb"] >= r["rss_before_mb"] > 0
    assert [mp.fast_linears for mp in made] == [precision == "bf16"]
    assert loop.MixedPrecision is amp.MixedPrecision  # the native row's kernels end with its run


def _recording(init, made: list):
    def post_init(self):
        init(self)
        made.append(self)

    return post_init


@pytest.mark.parametrize("slow_bf16", [True, False])
def test_training_suite_adds_autocasts_own_kernels_where_bf16_multiplies_in_fp32(monkeypatch, slow_bf16):
    monkeypatch.setattr(training_suite.cpu_autocast, "wanted", lambda device, dtype: slow_bf16)
    ran = []
    monkeypatch.setattr(training_suite, "_in_subprocess", lambda config, precision, *a: ran.append(precision) or
                        dict(step_s=1.0, peak_mb=2.0, rss_before_mb=1.0, skipped=0, losses=[2.0, 1.0, 1.0, 1.0]))  # fmt: skip
    training_suite.run(model="tiny-llama", progress=False)
    expected = ["fp32", "bf16", "fp16"] + (["bf16 native"] if slow_bf16 else [])
    assert ran == expected * 2  # LoRA, then full fine-tuning


def test_training_suite_ratios_are_against_the_same_configs_fp32_run(monkeypatch):
    fake = {"fp32": dict(step_s=2.0, peak_mb=400.0, rss_before_mb=100.0, skipped=0, losses=[4.0, 3.0, 2.0, 1.0]),
            "bf16": dict(step_s=1.0, peak_mb=300.0, rss_before_mb=100.0, skipped=1, losses=[4.0, 3.3, 2.0, 1.5])}  # fmt: skip
    monkeypatch.setattr(training_suite, "_in_subprocess", lambda config, precision, *a: fake[precision])
    monkeypatch.setattr(training_suite.cpu_autocast, "wanted", lambda device, dtype: False)
    monkeypatch.setattr(training_suite, "PRECISIONS", {p: training_suite.PRECISIONS[p] for p in fake})
    rows = training_suite.run(model="tiny-llama", progress=False)
    step = {(r["config"], r["precision"]): r for r in rows if r["table"] == "training/step"}
    assert step["lora", "bf16"]["speedup_vs_fp32"] == 2.0 and step["full", "bf16"]["peak_vs_fp32"] == 0.75
    assert step["lora", "fp32"]["peak_over_start_MiB"] == 300.0 and step["lora", "bf16"]["skipped_steps"] == 1
    (loss,) = [r for r in rows if r["table"] == "training/loss" and r["config"] == "lora" and r["precision"] == "bf16"]
    assert (loss["loss@2"], loss["loss@4"], loss["mean_loss_last_1"]) == (3.3, 1.5, 1.5)
    assert loss["vs_fp32_%"] == pytest.approx(50.0) and loss["max_step_diff_vs_fp32_%"] == pytest.approx(50.0)
