"""The serving Engine when things go wrong: a step that raises, close, an engine dropped without close, and an
engine thread that dies."""

from __future__ import annotations

import threading
import time

import pytest

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import engine as engine_module
from tests.serving.conftest import _alone, _prompts, fail_third_sampling_call


def test_a_fault_in_a_step_fails_its_batch_and_the_engine_keeps_serving(llama, monkeypatch):
    real = engine_module.sample_batch
    fail_third_sampling_call(monkeypatch)
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    prompts = _prompts(6, seed=3)
    with llmspeed.Engine(llama) as engine:
        handles = [engine.submit(p, sp) for p in prompts]
        outs = [h.result(timeout=60) for h in handles]
        after = engine.submit(prompts[0], sp).result(timeout=60)
    monkeypatch.setattr(engine_module, "sample_batch", real)
    expected = _alone(llama, prompts, sp)
    assert any(o.finish_reason == "error" and "injected" in o.error for o in outs)
    assert all(o.token_ids == e for o, e in zip(outs, expected) if o.finish_reason != "error")
    assert after.token_ids == expected[0]


def test_close_aborts_running_requests_and_refuses_new_ones(llama):
    engine = llmspeed.Engine(llama, kv_cache_tokens=20_000)
    h = engine.submit([1, 2], SamplingParams(max_new_tokens=10_000, ignore_eos=True))
    time.sleep(0.05)
    engine.close()
    assert h.result(timeout=10).finish_reason == "abort"
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([1, 2])
    engine = llmspeed.Engine(llama, kv_cache_tokens=20_000)
    h = engine.submit([1, 2], SamplingParams(max_new_tokens=10_000, ignore_eos=True))
    with engine._cv:  # the engine thread has not taken the close yet: the request is still running
        engine.close(timeout=0)
        h.abort()  # a client leaving during shutdown: a no-op, not "the engine is closed"
        assert not h.done()
    assert h.result(timeout=10).finish_reason == "abort"
    engine.close()
    with pytest.raises(TypeError, match="SamplingParams"):
        llmspeed.Engine(llama).submit([1], "greedy")
    with pytest.raises(TimeoutError):
        with llmspeed.Engine(llama, kv_cache_tokens=20_000) as e2:
            e2.submit([1, 2], SamplingParams(max_new_tokens=10_000, ignore_eos=True)).result(timeout=0.01)


def test_an_engine_dropped_without_close_stops_its_thread(llama):
    import gc

    engine = llmspeed.Engine(llama)
    h = engine.submit([1, 2], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert h.result(timeout=30).finish_reason == "length"
    thread = engine._thread
    del engine, h  # the handle holds its engine; the output does not
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()  # __del__ closed it: no thread (and KV cache) left behind per dropped engine


class _Fatal(BaseException):
    """An exception the engine thread does not survive (as ``KeyboardInterrupt`` or ``SystemExit`` raised in it)."""


def test_a_dead_engine_thread_ends_its_requests_and_refuses_new_ones(llama, monkeypatch):
    """Regression: an exception the engine thread did not survive (a ``BaseException`` from a step or from queueing a
    request) left its callers waiting forever: the running request, the ones taken from the inbox but not yet queued
    and the ones still in the inbox never got a final event, and ``submit`` kept accepting requests nobody would run.
    Now every one of them ends with ``"error"`` naming the death, ``submit`` raises it and ``error`` holds it."""
    from llmspeed.serving import Engine
    from llmspeed.serving.engine import ENGINE_DIED

    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the dying thread's traceback is expected
    engine = Engine(llama, kv_cache_tokens=1024)
    real_add, adds = engine.generator.add_request, [0]

    def add_request(*args, **kwargs):
        adds[0] += 1
        if adds[0] == 3:
            raise _Fatal("queueing died")
        return real_add(*args, **kwargs)

    monkeypatch.setattr(engine.generator, "add_request", add_request)
    sp = SamplingParams(max_new_tokens=50, ignore_eos=True)
    running = engine.submit([1, 2, 3], sp)
    next(iter(running))  # it runs: a token arrived
    with engine._cv:  # taken from the inbox together: queued, dies while queueing, never reached
        handles = [engine.submit([4, 5, 6], sp) for _ in range(3)]
    for h in [running, *handles]:
        out = h.result(timeout=10)  # waited forever before the fix
        assert out.finish_reason == "error" and out.error.startswith(ENGINE_DIED) and "queueing died" in out.error
    assert engine.metrics()["requests_finished"] == 4  # the requests the death ended counted (/metrics missed them)
    assert engine.closed and "_Fatal: queueing died" in engine.error
    with pytest.raises(RuntimeError, match=ENGINE_DIED):
        engine.submit([1, 2, 3], sp)
    engine.close(timeout=5)
    engine.close(timeout=5)
    assert not engine._thread.is_alive()


def test_a_step_that_kills_the_engine_thread_ends_the_running_requests(llama, monkeypatch):
    """Regression: a ``BaseException`` from a step killed the engine thread and its requests waited forever."""
    from llmspeed.serving import Engine

    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    engine = Engine(llama, kv_cache_tokens=1024)
    real_step, steps = engine.generator.step, [0]

    def step():
        steps[0] += 1
        if steps[0] == 3:
            raise _Fatal("step died")
        return real_step()

    monkeypatch.setattr(engine.generator, "step", step)
    handles = [engine.submit([1, 2, 3 + i], SamplingParams(max_new_tokens=50, ignore_eos=True)) for i in range(3)]
    for h in handles:
        assert "step died" in h.result(timeout=10).error  # waited forever before the fix
        assert h.result(timeout=0).request_id == h.request_id  # the output names its own request
        events = list(h)  # the stream ends too, with its final event
        assert events[-1].finished and "step died" in events[-1].output.error
    engine.close(timeout=5)


def test_a_step_that_always_raises_before_scheduling_ends_the_requests_instead_of_spinning(llama, monkeypatch):
    """Regression: a fault raised by every step before the scheduler ran (here: the adapter check) touched no
    request, so none ended: the engine thread spun a core forever and every caller waited forever."""
    from llmspeed.serving import engine as serving_engine

    with llmspeed.Engine(llama) as engine:
        monkeypatch.setattr(engine.generator, "_follow_adapter_changes",
                            lambda: (_ for _ in ()).throw(RuntimeError("injected pre-step fault")))
        h = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4, ignore_eos=True))
        out = h.result(timeout=30)
        assert out.finish_reason == "error" and "injected pre-step fault" in out.error and out.request_id == h.request_id
        assert f"raised {serving_engine.MAX_FAILING_TURNS} times in a row" in out.error
        assert engine.metrics()["requests_finished"] == 1  # ended by the failing turns: counted (/metrics missed it)
        errors = engine.loop_errors
        time.sleep(0.5)  # the fault goes on (the abort's event is queued): the failing turns back off, not spin
        assert engine.loop_errors - errors < 100
        second = engine.submit([4, 5], SamplingParams(max_new_tokens=4, ignore_eos=True)).result(timeout=30)
        assert f"raised {serving_engine.MAX_FAILING_TURNS} times in a row" in second.error  # the count started over
        monkeypatch.undo()  # the fault gone, the same engine serves again
        again = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4, ignore_eos=True)).result(timeout=30)
        assert again.finish_reason == "length" and len(again.token_ids) == 4
        assert h.result(timeout=0).finish_reason == "error"  # the generator's abort event did not reach it after
        assert engine.metrics()["requests_finished"] == 3


def test_events_queued_before_a_raising_adapter_check_are_not_lost(llama, monkeypatch):
    """Regression: ``step`` took the queued events (an abort's final event) before the adapter check; when that
    raised, they were dropped and the aborted request never ended."""
    gen = Generator(llama, progress=False)
    rid = gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=4))
    gen.abort(rid)
    monkeypatch.setattr(gen, "_follow_adapter_changes", lambda: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        gen.step()
    monkeypatch.undo()
    events = gen.step()
    assert [(e.request_id, e.finished, e.output.finish_reason) for e in events] == [(rid, True, "abort")]
