"""Timing with medians and spread (shared machines are noisy), device time from CUDA graphs, and Markdown tables.

Below both the kernels (whose `kernel="auto"` times candidates) and the benchmark suites.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call over repeats: median, and spread as (max - min) / median."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Relative spread of the samples, (max - min) / median."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median > 0 else 0.0

    def __str__(self) -> str:
        return f"{self.median * 1e3:.3f} ms ±{self.spread * 50:.0f}%"


def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(
    fn: Callable[[], Any],
    repeats: int = 5,
    warmup: int = 1,
    inner: int = 1,
    device: str | torch.device | None = None,
) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls, then ``repeats`` samples of ``inner`` calls each."""
    return timeit_round_robin({"fn": fn}, repeats, warmup, device, inner)["fn"]


def timeit_round_robin(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
    inner: int = 1,
) -> dict[str, Timing]:
    """Time each of ``fns`` in rounds: one sample of every function per round, ``inner`` calls a sample.

    A benchmark comparing configurations one after the other on a shared machine gives each the noise
    of its own minutes; timed in rounds, a slow minute lands on all of them, and their ratios hold.
    ``warmup`` untimed rounds (one call of each) first. :func:`timeit` is the one-function case.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: Timing(tuple(times)) for name, times in samples.items()}


def copies_to_defeat_cache(nbytes: int, cache_bytes: int, most: int = 8) -> int:
    """How many distinct copies of ``nbytes`` of operands to rotate so that, together, they are at least
    twice ``cache_bytes`` (a GPU's L2): each call then reads its operands from memory, as in a real
    forward pass, not from the cache the previous call filled."""
    if nbytes <= 0:
        raise ValueError(f"nbytes must be > 0; got {nbytes}")
    return max(1, min(most, -(-2 * cache_bytes // nbytes)))


def timeit_cuda_graph(fns: Sequence[Callable[[], Any]], calls: int = 24, repeats: int = 9) -> Timing:
    """Seconds per call of device time: ``calls`` calls, cycling through ``fns``, captured in one CUDA graph.

    Replaying a graph launches every kernel with no Python or dispatcher work in between, which is how
    the generator's decode steps run; timing eager calls instead measures the host's dispatch when
    kernels are shorter than it (tens of microseconds at batch 1). Pass several ``fns`` over distinct
    copies of the operands (:func:`copies_to_defeat_cache`) so that no call finds them in L2.
    """
    if not fns:
        raise ValueError("fns must hold at least one callable")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # warm-up off the capture (allocations, autotuning, lazy kernel state)
            fn()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls)
    return Timing(tuple(samples))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render rows (dicts) as a Markdown table; columns default to every row's keys, in order of first use
    (a key only later rows carry, such as a note on one row, is a column too; other rows leave it empty)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def device_ms(fn: Callable[[], Any], calls: int = 5) -> float:
    """Milliseconds of CUDA device time for ``calls`` calls of ``fn``, replayed from one CUDA graph.

    Timing eager calls would measure the host's dispatch whenever a kernel is shorter than it (tens of
    microseconds at batch 1); replaying a graph is how decode steps run. A function that cannot be
    captured (a host sync, say) is timed eagerly.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up off the capture: autotuning, lazy weight conversion, kernel state
    torch.cuda.current_stream().wait_stream(side)
    run, per_run = fn, 1
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run, per_run = graph.replay, calls
    except RuntimeError:
        torch.cuda.synchronize()
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls // per_run):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def cpu_ms(
    fns: Mapping[str, Callable[[], Any]],
    budget_ms: float = 20.0,
    most: int = 25,
    drop: float = 4.0,
    errors: dict[str, BaseException] | None = None,
) -> dict[str, float]:
    """Milliseconds per call of each of ``fns`` on the CPU: the fastest of calls timed round-robin.

    One warm-up round first (lazy builds, first-touch pages), then a second round whose time, the
    faster of the two, decides which functions are in reach: one more than ``drop`` times the fastest
    cannot win and keeps that time. A function whose warm-up call already took more than ``2 * drop``
    times the fastest warm-up skips the second round too (a slow candidate on a large layer can take
    seconds a call). The others are timed in rounds, one call each per round, for about
    ``budget_ms`` each (at least 3 rounds, at most ``most``). Each keeps its fastest call: on a shared
    machine a call that lost its core (a scheduler quantum is 4-8 ms, longer than many kernels) is
    noise, not the kernel's speed, and a median of a few rounds can still be decided by it. A function
    that raises in its warm-up is left out (its exception goes into ``errors`` when given; else it
    propagates).
    """
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:
            if errors is None:
                raise
            errors[name] = exc
            continue
        first[name] = (time.perf_counter() - start) * 1e3
    if not first:
        return {}
    fastest_warmup = min(first.values())
    for name in first:
        if first[name] > 2 * drop * max(fastest_warmup, 1e-6):
            continue  # cannot win even if its warm-up was twice its speed
        start = time.perf_counter()
        fns[name]()
        first[name] = min(first[name], (time.perf_counter() - start) * 1e3)
    best = min(first.values())
    alive = [name for name, ms in first.items() if ms <= drop * max(best, 1e-6)]
    per_round = sum(first[name] for name in alive)
    rounds = max(3, min(most, int(budget_ms * len(alive) / max(per_round, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in alive}
    for _ in range(rounds):
        for name in alive:
            start = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {**first, **{name: min(values) for name, values in samples.items()}}
