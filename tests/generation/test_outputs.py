"""What the generator hands back (llmspeed.generation.outputs): run statistics and the step paths of a run."""

from __future__ import annotations

from llmspeed.generation.outputs import RunStats, paths_since


def test_throughput_of_a_run_that_took_no_time_is_zero_not_a_division_by_zero():
    stats = RunStats(requests=1, prompt_tokens=3, output_tokens=0, elapsed=0.0, steps=0, preemptions=0)
    assert stats.throughput == 0.0
    assert RunStats(1, 3, 10, 2.0, 10, 0).throughput == 5.0


def test_paths_since_counts_only_what_the_run_added():
    """A path no step of the run took is left out, and steps and seconds are the run's, not the generator's totals
    (mutations ``steps >= steps0`` and ``seconds`` not less ``seconds0`` survived)."""
    before = {"decode": (4, 1.0), "mixed": (2, 0.5)}
    now = {"decode": (7, 1.75), "mixed": (2, 0.5), "fused cpu": (1, 0.25)}
    assert paths_since(now, before) == {"decode": (3, 0.75), "fused cpu": (1, 0.25)}
