"""The decode-attention suite: one row per dtype and case, with the kernel's time and its read rate."""

from __future__ import annotations

import pytest

from llmspeed.bench import decode_attention


def test_quick_run_reports_every_case_for_every_cache_dtype():
    rows = decode_attention.run(model="tiny-llama", quick=True, progress=False)
    assert [(r["dtype"], r["sequences"], r["context"]) for r in rows] == [
        ("float32", 1, 128), ("float32", 8, 128), ("bfloat16", 1, 128), ("bfloat16", 8, 128),
        ("float16", 1, 128), ("float16", 8, 128)]  # fmt: skip
    for r in rows:
        assert r["kernel us per layer"] > 0 and r["SDPA us (contiguous)"] > 0 and r["layers"] >= 1
        # the read rate is the cache bytes over the kernel's time, nothing else
        # (within the rounding of its columns: MB to 0.001, us to 0.1, GB/s to 0.01; a tiny model's kernel takes
        # a few microseconds, so those bounds, not a fixed tolerance, are what the rate must lie in)
        mb, us = r["cache MB per layer"], r["kernel us per layer"]
        low, high = (mb - 5e-4) * 1e3 / (us + 0.05), (mb + 5e-4) * 1e3 / max(us - 0.05, 1e-9)
        assert low - 0.005 <= r["GB/s"] <= high + 0.005, r
    fp32, bf16, fp16 = rows[1], rows[3], rows[5]
    assert bf16["cache MB per layer"] == fp16["cache MB per layer"] == pytest.approx(fp32["cache MB per layer"] / 2, abs=0.01)


def test_it_refuses_a_gpu():
    with pytest.raises(ValueError, match="device='cuda'"):
        decode_attention.run(device="cuda", model="tiny-llama", quick=True)
