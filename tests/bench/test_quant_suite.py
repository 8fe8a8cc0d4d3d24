"""Quant suite pieces: the kernel microbenchmark's rows and baselines."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed.bench.quant import kernel_rows, run
from llmspeed.precision import cpu_matmul
from llmspeed.quant.kernels import KERNELS


def test_kernel_rows_compare_bf16_paths_with_what_a_cast_layer_runs(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 4})
    rows = kernel_rows("cpu", [(64, 96)], [1, 8], quick=True, progress=False)
    cases = [r["case"] for r in rows]
    # below the crossover a cast layer runs the native kernel; from it on, the fp32-block path, timed too
    assert "64x96 M=1 bf16 F.linear" in cases and not any(c.startswith("64x96 M=1 bf16 cast layer") for c in cases)
    assert "64x96 M=8 bf16 cast layer (fp32 blocks)" in cases
    for r in rows:
        if " bf16 " in r["case"] and r["case"].split()[2] in ("int8", "int4", "nf4"):
            expected = "bf16 cast layer" if "M=8" in r["case"] else "bf16 F.linear"
            assert r["baseline"] == expected, r
        assert r["value"] > 0 or r["value"] != r["value"]  # a time, or NaN for a failed aten op
    # int4 layers with int8 activations get rows of their own (their kernels see the input on its int8 grid)
    acts = [c for c in cases if " int4 int8-activations fp32 " in c]
    assert any(c.endswith("dequant_fp32") or "dequant_fp32 (auto)" in c for c in acts), acts
    if KERNELS["cpp_panels"].unavailable() is None:
        assert "64x96 M=8 int4 int8-activations fp32 cpp_panels" in cases  # timed (auto takes it from 9 rows)
        assert not any("cpp_panels" in c for c in cases if " int4 fp32 " in c)  # float-activation layers: never


def test_run_refuses_unknown_tables_before_loading_anything():
    with pytest.raises(ValueError, match=r"tables must be among \['perplexity', 'memory', 'kernels', 'decode'\]"):
        run(tables=["kernel"])


def test_memory_rows_count_the_decoders_linears_whether_the_head_is_tied_or_not():
    """Regression: with the int8 head as quantize's default, a tied model's "linear layers" row counted the head
    (its QuantizedEmbedding has no .weight, so the tie check matched None against None)."""
    import transformers

    from llmspeed.bench import quant as Q

    ratios = {}
    for tie in (False, True):
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)  # fmt: skip
        torch.manual_seed(0)
        model = llmspeed.wrap(transformers.AutoModelForCausalLM.from_config(cfg).eval())
        ratios[tie] = {r["case"]: r["vs_baseline"] for r in Q.memory_rows(model)}
    assert ratios[True]["int8 linear layers"] == pytest.approx(ratios[False]["int8 linear layers"], rel=1e-6)
    assert ratios[True]["int4 g64 linear layers"] < 0.16  # the head (int8, 512 x 256) would add 0.03
