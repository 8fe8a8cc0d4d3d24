"""Timing helpers: L2-defeating operand copies, and CUDA-graph timing (GPU only)."""

from __future__ import annotations

import math

import pytest
import torch

from llmspeed.bench import quant as quant_suite
from llmspeed.timing import copies_to_defeat_cache, markdown_table, timeit_cuda_graph


def test_copies_cover_twice_the_cache_within_bounds():
    l2 = 50 << 20
    assert copies_to_defeat_cache(117 << 20, l2) == 1  # a bf16 4096x14336 weight alone is > 2x L2
    assert copies_to_defeat_cache(29 << 20, l2) == 4  # its int4 copy: 4 x 29 MB >= 100 MB
    assert copies_to_defeat_cache(1 << 10, l2) == 8  # capped
    for nbytes in (1, 3 << 20, 33 << 20, 100 << 20):
        c = copies_to_defeat_cache(nbytes, l2, most=64)
        assert c * nbytes >= 2 * l2 or c == 64
        assert c == 1 or (c - 1) * nbytes < 2 * l2  # no more copies than needed
    with pytest.raises(ValueError, match="nbytes must be > 0; got 0"):
        copies_to_defeat_cache(0, l2)


@pytest.mark.gpu
def test_cuda_graph_timing_and_graph_kernel_rows():
    x = torch.randn(256, 256, device="cuda")
    small = timeit_cuda_graph([lambda: x @ x], calls=8, repeats=3)
    big_x = torch.randn(2048, 2048, device="cuda")
    big = timeit_cuda_graph([lambda: big_x @ big_x], calls=8, repeats=3)
    assert 0 < small.median < big.median  # 512x more work takes longer per call
    rows = quant_suite.graph_kernel_rows("cuda", k=512, n=1024, rows_m=(1,))
    cases = [r["case"] for r in rows]
    assert cases[0] == "512x1024 M=1 bf16 F.linear (CUDA graph)"
    assert any(" int4 bf16 " in c for c in cases) and any(" int8 bf16 " in c for c in cases)
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in rows if "failed" not in r["case"])


def test_cpu_ms_times_round_robin_and_drops_candidates_that_cannot_win():
    import time

    from llmspeed.timing import cpu_ms

    calls = {"fast": 0, "slow": 0, "medium": 0}

    def fast():
        calls["fast"] += 1
        sum(range(2000))

    def medium():  # about twice as slow: within reach, so timed every round
        calls["medium"] += 1
        sum(range(4000))

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    times = cpu_ms({"fast": fast, "medium": medium, "slow": slow}, budget_ms=2, most=7)
    assert calls["slow"] == 1  # its warm-up was >8x the fastest: not even a second warm-up call
    assert calls["fast"] == calls["medium"] and 5 <= calls["fast"] <= 9  # 2 warm-up + 3..7 rounds, one call each
    assert times["slow"] >= 20 > times["fast"]


def test_markdown_table_keeps_a_column_only_later_rows_carry():
    """Regression: columns came from the first row only, so a note on a later row (cpu_peers' "llama.cpp"
    crash note) vanished from the printed table."""
    table = markdown_table([{"a": 1}, {"a": 2, "note": "crashed"}]).splitlines()
    assert table[0] == "| a | note |"
    assert table[2] == "| 1 |  |" and table[3] == "| 2 | crashed |"


def test_round_robin_timing_calls_one_of_each_per_round_after_the_warm_up():
    import time

    from llmspeed.timing import timeit_round_robin

    order: list[str] = []

    def call(name: str, seconds: float):
        def run() -> None:
            order.append(name)
            time.sleep(seconds)

        return run

    times = timeit_round_robin({"a": call("a", 0.002), "b": call("b", 0.006)}, repeats=3, warmup=2)
    assert order == ["a", "b"] * 5  # 2 warm-up rounds, then 3 timed ones, each in the same order
    assert set(times) == {"a", "b"} and len(times["a"].samples) == len(times["b"].samples) == 3
    assert times["b"].median > times["a"].median >= 0.002
