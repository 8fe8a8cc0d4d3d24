"""The serving Engine: many threads and asyncio tasks on one model, exact results, streaming handles.

Prompts the engine copies or refuses are in test_engine_prompts.py; faults, close and a dead engine thread in
test_engine_faults.py.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

import llmspeed
from llmspeed import Generator, SamplingParams
from tests.serving.conftest import _alone, _prompts


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


def test_a_request_whose_event_loop_closed_is_aborted_not_run_to_the_end(llama):
    loop = asyncio.new_event_loop()
    with llmspeed.Engine(llama, kv_cache_tokens=20_000) as engine:
        h = engine._submit([1, 2], SamplingParams(max_new_tokens=10_000, ignore_eos=True), loop)
        loop.close()  # its caller is gone (a loop closed with the task still awaiting): nobody will read the events
        assert h.result(timeout=30).finish_reason == "abort"
        assert engine.loop_errors == 0


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
