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


class _Tail:
    """A request's detokenizer whose flush raises (``fails``) or finds a stop string in the held-back tail."""

    def __init__(self, fails: bool = False, stopped: bool = False):
        self.text, self.fails, self.stopped, self.stopped_by = "ab", fails, stopped, None

    def finish(self, check_stop: bool = True) -> str:
        if self.fails:
            raise IndexError("piece id is out of range")
        self.stopped = self.stopped or check_stop
        self.stopped_by = "cd" if check_stop else None
        return "c"


def _ended(reason: str, detok: _Tail, error: str | None = None, out: tuple[int, ...] = (5, 6, 9), **params):
    from llmspeed import SamplingParams
    from llmspeed.generation.sequence import Sequence

    seq = Sequence(7, [1, 2], SamplingParams(max_new_tokens=3, **params), index=2, output_ids=list(out))
    seq.detok, seq.finish_reason, seq.error, seq.token_times = detok, reason, error, [1.0, 2.0, 3.0]
    return seq.final_event(reason, 9, "x", "lp")


def test_final_event_reports_a_flush_that_raised_keeps_the_first_error_and_turns_only_length_into_stop():
    """Sequence.final_event (mutations that survived the tests: the raise not turned into ``"error"``, an earlier
    error replaced by the flush's, an abort or an error with a stop string in its tail reported as ``"stop"``, no
    finish time, the logprobs or the text dropped)."""
    event = _ended("length", _Tail(fails=True))
    assert event.finished and (event.token_id, event.text, event.logprobs, event.index) == (9, "x", "lp", 2)
    out = event.output
    assert out.finish_reason == "error" and out.error == "decoding its output raised IndexError: piece id is out of range"
    assert out.text == "ab" and out.token_ids == [5, 6, 9] and out.metrics.latency is not None
    assert _ended("error", _Tail(fails=True), error="the step failed").output.error == "the step failed"
    # a flush that raised stays "error" even with a stop string found before it (it never turns into "stop")
    assert _ended("length", _Tail(fails=True, stopped=True)).output.finish_reason == "error"
    for reason in ("abort", "error", "stop"):
        assert _ended(reason, _Tail(stopped=True)).output.finish_reason == reason
    event = _ended("length", _Tail())
    assert (event.text, event.output.finish_reason, event.output.stop_reason) == ("xc", "stop", "cd")
    assert _ended("length", _Tail(), out=(5,), min_tokens=2).output.finish_reason == "length"  # before min_tokens
