"""Quant suite pieces: the kernel microbenchmark's rows and baselines."""

from __future__ import annotations

import pytest
import torch

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
