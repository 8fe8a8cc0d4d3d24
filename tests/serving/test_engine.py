"""The serving Engine: many threads and asyncio tasks on one model, exact results, aborts, faults."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import engine as engine_module
from tests.serving.conftest import fail_third_sampling_call


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (int(k),), generator=g).tolist() for k in torch.randint(3, 24, (n,), generator=g)]


def _alone(model, prompts, sp):
    return [Generator(model, progress=False).generate_batched([p], sp)[0].token_ids for p in prompts]


def test_threads_get_exactly_their_own_results_with_aborts_and_bad_requests(llama):
    prompts = _prompts(12, seed=1)
    sps = [SamplingParams(max_new_tokens=4 + i % 5, ignore_eos=True) for i in range(12)]
    expected = [_alone(llama, [p], sp)[0] for p, sp in zip(prompts, sps)]
    results: list[tuple] = []
    lock = threading.Lock()

    def worker(w):
        rng = random.Random(w)
        for k in range(10):
            i = rng.randrange(12)
            bad = k == 7 and w % 2 == 0
            h = engine.submit([999999] if bad else prompts[i], sps[i])
            if not bad and rng.random() < 0.2:
                time.sleep(rng.random() * 0.01)
                h.abort()
            out = h.result(timeout=60)
            with lock:
                results.append((i, bad, out))

    with llmspeed.Engine(llama, kv_cache_tokens=2048, max_seqs=16) as engine:
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = engine.metrics()
    assert len(results) == 60
    for i, bad, out in results:
        if bad:
            assert out.finish_reason == "error" and "token ids" in out.error
        elif out.finish_reason == "abort":
            assert out.token_ids == expected[i][: len(out.token_ids)]
        else:
            assert out.finish_reason == "length" and out.token_ids == expected[i] and out.prompt_token_ids == prompts[i]
    assert metrics["requests_running"] == metrics["requests_waiting"] == 0
    assert metrics["kv_blocks_used"] == 0 and engine.generator.num_live == 0


def test_a_chat_prompt_the_template_cannot_render_ends_with_an_error_not_a_hang(llama):
    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    with llmspeed.Engine(llama) as engine:
        bad = engine.submit([{"role": "user"}], SamplingParams(max_new_tokens=2))
        good = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))
        out = bad.result(timeout=30)
        assert out.finish_reason == "error" and "chat template" in out.error
        assert good.result(timeout=30).finish_reason == "length"
        assert engine.loop_errors == 0


def test_a_prompt_the_tokenizer_cannot_encode_fails_alone_and_its_inbox_neighbours_run(llama, monkeypatch):
    """A lone surrogate ("\\ud800" is valid JSON) makes a Hugging Face fast tokenizer raise TypeError: that request
    ends with an error, and the requests queued in the same inbox batch still run (they used to hang with it)."""
    from tests.generation.test_engine import CharTokenizer

    class FastLikeTokenizer(CharTokenizer):
        def encode(self, text):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
                raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
            return super().encode(text)

    llama.tokenizer = FastLikeTokenizer()
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    with llmspeed.Engine(llama) as engine:
        with engine._cv:  # the engine thread takes all three in one inbox batch
            handles = [engine.submit(p, sp) for p in ("ab", "a\ud800", [1, 2, 3])]
        outs = [h.result(timeout=20) for h in handles]
        assert outs[1].finish_reason == "error" and "not valid Unicode" in outs[1].error and "ud800" in outs[1].error
        assert outs[0].finish_reason == outs[2].finish_reason == "length" and outs[0].prompt_token_ids == [97, 98]
        assert engine.loop_errors == 0
        real = engine.generator.add_request

        def broken(prompt, sampling=None, **kw):  # add_request raising anyway (a bug) fails its own request only
            if prompt == [7, 7]:
                raise RuntimeError("injected add fault")
            return real(prompt, sampling, **kw)

        monkeypatch.setattr(engine.generator, "add_request", broken)
        with engine._cv:
            handles = [engine.submit(p, sp) for p in ([7, 7], [1, 2, 3])]
        bad, good = (h.result(timeout=20) for h in handles)
        assert bad.finish_reason == "error" and "injected add fault" in bad.error
        assert good.token_ids == outs[2].token_ids and engine.loop_errors == 1
        assert engine.metrics()["requests_finished"] == 5  # the refused one counted too (/metrics missed it)


def test_boolean_token_ids_are_refused_not_read_as_0_and_1(llama):
    with llmspeed.Engine(llama) as engine:
        for prompt in ([True, 2], torch.tensor([True, False]), [1, torch.tensor(True)]):
            out = engine.submit(prompt, SamplingParams(max_new_tokens=2)).result(timeout=20)
            assert out.finish_reason == "error" and "must be integers" in out.error and "True" in out.error, prompt
        assert engine.submit([1, 2], SamplingParams(max_new_tokens=2)).result(timeout=20).prompt_token_ids == [1, 2]


def test_iterating_a_handle_streams_text_that_adds_up(llama):
    from tests.generation.test_engine import CharTokenizer

    llama.tokenizer = CharTokenizer()
    with llmspeed.Engine(llama) as engine:
        h = engine.submit("ABC", SamplingParams(max_new_tokens=10, ignore_eos=True))
        events = list(h)
        out = h.result(timeout=0)
    assert events[-1].finished and len(events) == 10
    assert "".join(e.text for e in events) == out.text
    assert [e.token_id for e in events] == out.token_ids


def test_iterating_a_handle_again_after_its_final_event_raises_instead_of_hanging(llama):
    sp = SamplingParams(max_new_tokens=40, ignore_eos=True)

    def bounded(fn):  # runs fn in a thread: a hang fails the test instead of stopping the suite
        box = []
        t = threading.Thread(target=lambda: box.append(_outcome(fn)), daemon=True)
        t.start()
        t.join(20)
        assert box, "the call hung"
        return box[0]

    def _outcome(fn):
        try:
            return fn()
        except RuntimeError as err:
            return err

    with llmspeed.Engine(llama) as engine:
        h = engine.submit([1, 2, 3], sp)
        first = bounded(lambda: list(h))
        assert len(first) == 40 and first[-1].finished
        again = bounded(lambda: list(h))
        assert isinstance(again, RuntimeError) and "already iterated" in str(again)
        with pytest.raises(TypeError, match="not submitted from asyncio: iterate it with `for`"):
            asyncio.run(anext(h.events()))
        h2 = engine.submit([1, 2, 3], sp)  # three loops over one handle: each event goes to one, and all end
        got: list = []
        ends: list = []

        def loop():
            def take():
                for event in h2:
                    got.append(event)
                return "done"

            ends.append(bounded(take))

        threads = [threading.Thread(target=loop) for _ in range(3)]  # the loop that ends wakes the next, and so on
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(ends) == 3 and ends.count("done") == 1 and all("already iterated" in str(e) for e in ends if e != "done")
        assert len(got) == 40 and sum(e.finished for e in got) == 1
        assert sorted(e.token_id for e in got) == sorted(h2.result(timeout=0).token_ids)

        async def twice():
            ah = engine._submit([1, 2, 3], sp, asyncio.get_running_loop())
            events = [e async for e in ah.events()]
            with pytest.raises(RuntimeError, match="already iterated"):
                async for _ in ah.events():
                    pass
            with pytest.raises(TypeError, match="submitted from asyncio: iterate it with `async for`"):
                next(iter(ah))  # after the end: a wrong-mode loop that did block would fail here, not hang
            return events

        assert len(asyncio.run(asyncio.wait_for(twice(), 20))) == 40


def test_asyncio_generate_stream_and_cancel(llama):
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = _alone(llama, [[1, 2, 3]], sp)[0]

    async def main(engine):
        outs = await asyncio.gather(*[engine.generate([1, 2, 3], sp) for _ in range(5)])
        tokens = [ev.token_id async for ev in engine.stream([1, 2, 3], sp)]
        long = SamplingParams(max_new_tokens=10_000, ignore_eos=True)
        task = asyncio.ensure_future(engine.generate([4, 5], long))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        agen = engine.stream([4, 5], long)
        async for _ in agen:  # a consumer that leaves early
            break
        await agen.aclose()
        return outs, tokens

    with llmspeed.Engine(llama, kv_cache_tokens=20_000) as engine:
        outs, tokens = asyncio.run(main(engine))
        deadline = time.time() + 10
        while engine.generator.num_live and time.time() < deadline:
            time.sleep(0.01)
        assert engine.generator.num_live == 0  # the cancelled and the abandoned requests were aborted
    assert all(o.token_ids == expected for o in outs) and tokens == expected


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


def test_a_prompt_list_the_caller_reuses_after_submit_is_the_one_submitted(llama):
    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    expected = _alone(llama, [[1, 2, 3]], sp)[0]
    with llmspeed.Engine(llama) as engine:
        ids, messages = [1, 2, 3], [{"role": "user", "content": "hi"}]
        chat_ids = engine.submit(list(messages), sp).result(timeout=30).prompt_token_ids
        with engine._cv:  # the engine thread cannot take the inbox before the caller reuses its lists
            h = engine.submit(ids, sp)
            hc = engine.submit(messages, sp)
            ids[:] = [7, 8, 9, 10]
            messages[0]["content"] = "something else"
        out = h.result(timeout=30)
        assert out.prompt_token_ids == [1, 2, 3] and out.token_ids == expected
        assert hc.result(timeout=30).prompt_token_ids == chat_ids



def test_a_tuple_or_tensor_prompt_the_caller_changes_after_submit_is_the_one_submitted(llama):
    """Regression: only list prompts were copied at submit; a tensor changed in place, or a message dict in a tuple
    of messages, before the engine thread read it changed the running request."""
    import numpy as np

    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    expected = _alone(llama, [[1, 2, 3]], sp)[0]
    with llmspeed.Engine(llama) as engine:
        chat_ids = engine.submit([{"role": "user", "content": "hi"}], sp).result(timeout=30).prompt_token_ids
        tensor, array, messages = torch.tensor([1, 2, 3]), np.array([1, 2, 3]), ({"role": "user", "content": "hi"},)
        with engine._cv:  # the engine thread cannot take the inbox before the caller changes its prompts
            handles = [engine.submit(p, sp) for p in (tensor, tensor[:], array)]
            hc = engine.submit(messages, sp)
            tensor[:] = torch.tensor([7, 8, 9])
            array[:] = [7, 8, 9]
            messages[0]["content"] = "something else"
        for h in handles:
            out = h.result(timeout=30)
            assert out.prompt_token_ids == [1, 2, 3] and out.token_ids == expected
        assert hc.result(timeout=30).prompt_token_ids == chat_ids


def test_a_content_part_the_caller_changes_after_submit_is_the_one_submitted(llama):
    """Regression: message dicts were copied one level deep at submit, so a caller changing a content part (a
    nested dict) before the engine thread rendered the conversation changed the running request."""
    from tests.generation.test_engine import ChatTokenizer

    class PartsTokenizer(ChatTokenizer):  # renders OpenAI's content parts, [{"type": "text", "text": ...}]
        chat_template = "{% for m in messages %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endfor %}"

        def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
            return [b for m in messages for part in m["content"] for b in part["text"].encode("latin-1")]

    llama.tokenizer = PartsTokenizer()
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    with llmspeed.Engine(llama) as engine:
        messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        with engine._cv:  # the engine thread cannot take the inbox before the caller changes the part
            h = engine.submit(messages, sp)
            messages[0]["content"][0]["text"] = "something else"
        assert h.result(timeout=30).prompt_token_ids == list(b"hi")


def test_a_request_whose_event_loop_closed_is_aborted_not_run_to_the_end(llama):
    loop = asyncio.new_event_loop()
    with llmspeed.Engine(llama, kv_cache_tokens=20_000) as engine:
        h = engine._submit([1, 2], SamplingParams(max_new_tokens=10_000, ignore_eos=True), loop)
        loop.close()  # its caller is gone (a loop closed with the task still awaiting): nobody will read the events
        assert h.result(timeout=30).finish_reason == "abort"
        assert engine.loop_errors == 0


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


def test_seeded_sampling_from_threads_and_two_event_loops_gives_each_caller_its_prompt_run_alone(llama):
    prompts = _prompts(6, seed=5)
    sps = [SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=100 + i, ignore_eos=True) for i in range(6)]
    expected = [_alone(llama, [p], sp)[0] for p, sp in zip(prompts, sps)]
    got: list[tuple[int, list[int]]] = []
    lock = threading.Lock()

    def in_a_loop():
        async def main():
            return await asyncio.gather(*[engine.generate(prompts[i % 6], sps[i % 6]) for i in range(12)])

        outs = asyncio.run(asyncio.wait_for(main(), 60))
        with lock:
            got.extend((i % 6, o.token_ids) for i, o in enumerate(outs))

    def in_a_thread():
        handles = [(i, engine.submit(prompts[i], sps[i])) for i in range(6)]
        with lock:
            got.extend((i, h.result(timeout=60).token_ids) for i, h in handles)

    with llmspeed.Engine(llama, kv_cache_tokens=4096, max_seqs=16) as engine:
        threads = [threading.Thread(target=f) for f in (in_a_loop, in_a_loop, in_a_thread, in_a_thread)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    assert len(got) == 36 and all(tokens == expected[i] for i, tokens in got)


@pytest.mark.parametrize("fused", [False, True])
def test_two_engines_on_one_model_each_get_their_own_adapters(llama, fused):
    """Regression: two engines stepping one model from their own threads set LoRA routing and the attention
    implementation on the shared model at the same time: requests failed ("per-token adapters were given for 364
    tokens but this layer received 441"), could have run with each other's adapters, and the model's config was
    left on llmspeed's attention implementation, which fails every later ``model.hf.generate``."""
    from llmspeed import lora

    for name in ("a", "b"):
        lora.add_adapter(llama, name, r=4)
    for n, p in llama.hf.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # each adapter changes the tokens
    prompts = _prompts(12, seed=3)
    sps = [SamplingParams(max_new_tokens=6, ignore_eos=True, adapter="ab"[i % 2]) for i in range(12)]
    kw = dict(fused_decode=fused)
    expected = [Generator(llama, progress=False, **kw).generate_batched([p], sp)[0].token_ids
                for p, sp in zip(prompts, sps)]  # fmt: skip
    assert expected[0] != Generator(llama, progress=False, **kw).generate_batched([prompts[0]], sps[1])[0].token_ids
    wrong: list = []
    with llmspeed.Engine(llama, **kw) as e0, llmspeed.Engine(llama, **kw) as e1:

        def client(engine, start):
            for _ in range(3):
                handles = [(i, engine.submit(prompts[i], sps[i])) for i in range(start, 12, 2)]
                wrong.extend((i, out.finish_reason, out.error) for i, h in handles
                             if (out := h.result(timeout=60)).token_ids != expected[i])  # fmt: skip

        threads = [threading.Thread(target=client, args=(e, k)) for k, e in enumerate((e0, e1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert wrong == []
    assert llama.hf.config._attn_implementation not in ("llmspeed",)
    llama.hf.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False)  # the model still works alone


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
