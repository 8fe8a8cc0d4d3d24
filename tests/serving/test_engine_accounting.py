"""The serving Engine's bookkeeping: what /metrics counts, the handles it lets go, faults that are not in a row."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import llmspeed
from llmspeed import SamplingParams
from llmspeed.serving import engine as serving_engine


def test_metrics_count_running_and_waiting_requests_and_the_tokens_handed_out(llama):
    long = SamplingParams(max_new_tokens=10_000, ignore_eos=True)
    with llmspeed.Engine(llama, kv_cache_tokens=20_000, max_seqs=1) as engine:
        handles = [engine.submit([1, 2, 3 + i], long) for i in range(3)]
        next(iter(handles[0]))  # the first runs; max_seqs=1 keeps the other two waiting
        metrics = engine.metrics()
        assert (metrics["requests_running"], metrics["requests_waiting"]) == (1, 2)
        for h in handles:
            h.abort()
        outs = [h.result(timeout=30) for h in handles]
        outs.append(engine.submit([4, 5], SamplingParams(max_new_tokens=3, ignore_eos=True)).result(timeout=30))
        metrics = engine.metrics()
    assert [o.finish_reason for o in outs] == ["abort"] * 3 + ["length"]
    # an aborted request's final event carries no token: it is not counted as one
    assert metrics["tokens_generated"] == sum(len(o.token_ids) for o in outs)
    assert metrics["requests_finished"] == 4


def test_the_engine_lets_go_of_the_handles_of_ended_requests(llama):
    """The engine drops its reference to a handle when the request ends: a long-lived engine does not keep every
    handle (and its events and output) it ever served."""
    with llmspeed.Engine(llama, kv_cache_tokens=20_000) as engine:
        done = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))
        aborted = engine.submit([4, 5], SamplingParams(max_new_tokens=10_000, ignore_eos=True))
        next(iter(aborted))
        aborted.abort()
        outs = [h.result(timeout=30) for h in (done, aborted)]
        refs = [weakref.ref(done), weakref.ref(aborted)]
        del done, aborted
        deadline = time.time() + 10  # the engine thread may still hold the last one it delivered, for a moment
        while any(r() is not None for r in refs) and time.time() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert all(r() is None for r in refs)
        assert [o.finish_reason for o in outs] == ["length", "abort"] and not engine._handles


def test_step_faults_that_are_not_in_a_row_do_not_end_the_requests(llama, monkeypatch):
    """Only MAX_FAILING_TURNS failing turns *in a row* end the requests held: a step that succeeds in between
    resets the count, so a request outliving many scattered faults still runs to its end."""
    n = 3 * serving_engine.MAX_FAILING_TURNS
    with llmspeed.Engine(llama) as engine:
        real, calls = engine.generator._follow_adapter_changes, [0]

        def every_other_step():
            calls[0] += 1
            if calls[0] % 2:
                raise RuntimeError("injected intermittent fault")
            return real()

        monkeypatch.setattr(engine.generator, "_follow_adapter_changes", every_other_step)
        out = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=n, ignore_eos=True)).result(timeout=60)
        assert out.finish_reason == "length" and len(out.token_ids) == n, out.error
        assert engine.loop_errors >= serving_engine.MAX_FAILING_TURNS


class _Fatal(BaseException):
    """An exception the engine thread does not survive."""


def test_a_request_refused_before_the_engine_thread_died_keeps_its_own_error(llama, monkeypatch):
    """The engine thread's death ends the requests it holds, not again one already ended: a request refused earlier
    in the same inbox batch keeps its own error and is counted once."""
    from llmspeed.serving import Engine

    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the dying thread's traceback is expected
    engine = Engine(llama)
    real = engine.generator.add_request

    def add_request(prompt, sampling=None, **kw):
        if prompt == [7, 7]:
            raise RuntimeError("injected add fault")
        if prompt == [8, 8]:
            raise _Fatal("queueing died")
        return real(prompt, sampling, **kw)

    monkeypatch.setattr(engine.generator, "add_request", add_request)
    sp = SamplingParams(max_new_tokens=2)
    with engine._cv:  # taken from the inbox together: the first refused, the second kills the thread
        refused, dying = (engine.submit(p, sp) for p in ([7, 7], [8, 8]))
    assert dying.result(timeout=10).error.startswith(serving_engine.ENGINE_DIED)
    assert "injected add fault" in refused.result(timeout=0).error
    assert engine.metrics()["requests_finished"] == 2
    engine.close(timeout=5)
