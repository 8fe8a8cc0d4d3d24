"""What ``/metrics`` reports about requests that ended: prompt tokens, how each ended, and histograms of the time to
the first token, the time between tokens and the whole request's latency, in Prometheus' text format (the series
vLLM's dashboards plot, under ``llmspeed_`` names).

:class:`RequestStats` is fed by the engine thread (:meth:`observe`, one finished output at a time) and read by the
server's ``/metrics`` (:meth:`lines`) under one lock.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

# seconds; vLLM's buckets for the same histograms (TTFT, time per output token, end-to-end latency)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


@dataclass
class Histogram:
    """A cumulative Prometheus histogram over ``bounds`` (upper bounds, ascending; ``+Inf`` is implied)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; the last is +Inf's
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is at least it."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        """The ``_bucket`` (cumulative, ``le`` labels), ``_sum`` and ``_count`` samples."""
        out, running = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{name}_sum {self.total!r}", f"{name}_count {running}"]


class RequestStats:
    """Counters and histograms over the requests that ended (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TPOT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def observe(self, output: Any) -> None:
        """Count one finished :class:`~llmspeed.generation.GenerationOutput` (its ``metrics`` and ``finish_reason``);
        the histograms take requests that produced a token (a request refused at admission has no serving time)."""
        m = output.metrics
        with self._lock:
            self.prompt_tokens += m.prompt_tokens
            self.finished[output.finish_reason] = self.finished.get(output.finish_reason, 0) + 1
            if not m.output_tokens:
                return
            for histogram, value in ((self.ttft, m.time_to_first_token), (self.per_token, m.inter_token_latency),
                                     (self.latency, m.latency)):  # fmt: skip
                if value is not None:
                    histogram.observe(float(value))

    def lines(self, prefix: str = "llmspeed_") -> list[str]:
        """Prometheus text lines (``# HELP``, ``# TYPE`` and samples) for every series."""
        with self._lock:
            out = [f"# HELP {prefix}prompt_tokens_total Prompt tokens of the requests that ended",
                   f"# TYPE {prefix}prompt_tokens_total counter", f"{prefix}prompt_tokens_total {self.prompt_tokens}",
                   f"# HELP {prefix}request_finished_total Requests that ended, by how they ended",
                   f"# TYPE {prefix}request_finished_total counter"]  # fmt: skip
            out += [f'{prefix}request_finished_total{{finished_reason="{reason}"}} {n}'
                    for reason, n in sorted(self.finished.items())]  # fmt: skip
            for name, what, histogram in (
                ("time_to_first_token_seconds", "From a request's arrival to its first token", self.ttft),
                ("time_per_output_token_seconds", "Mean time between a request's tokens", self.per_token),
                ("e2e_request_latency_seconds", "From a request's arrival to its end", self.latency),
            ):
                out += [f"# HELP {prefix}{name} {what}", f"# TYPE {prefix}{name} histogram",
                        *histogram.lines(prefix + name)]  # fmt: skip
            return out


__all__ = ["Histogram", "RequestStats"]
