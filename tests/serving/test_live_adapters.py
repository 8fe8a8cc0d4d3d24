"""LoRA verbs called from another thread while an Engine serves: they wait for the step in flight, requests bound to
a deleted adapter end alone with a clear error, the others keep their exact tokens, and the engine serves on."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import llmspeed
from llmspeed import Generator, SamplingParams, lora
from llmspeed.protocol import step_lock


def _random_adapters(model, names):
    for k, name in enumerate(names):
        lora.add_adapter(model, name, r=4, alpha=8)
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for _, layer in lora.lora_layers(model):
                if name in layer.lora_A:
                    layer.weight_b(name).copy_(torch.randn(layer.weight_b(name).shape, generator=g) * 0.5)
    lora.set_adapter(model, None)


@pytest.mark.parametrize(("where", "fused"), [("before", None), ("before", False), ("inside", False)])
def test_an_adapter_deleted_from_another_thread_mid_step_fails_only_its_requests(llama, where, fused):
    """Regression: ``lora.delete_adapter`` from another thread ran while the engine thread was in a step, between the
    step's adapter check and its forward (``before``) or inside the forward (``inside``): the step met adapter "a"
    gone and raised, failing every request of its batch, those naming adapter "b" or none included. Now the verbs
    and the step hold the model's step lock: the delete waits for the step, and only the request bound to "a" ends,
    saying it was deleted."""
    _random_adapters(llama, ["a", "b"])
    prompt = [1, 2, 3, 4]
    sps = {n: SamplingParams(max_new_tokens=10, ignore_eos=True, adapter=n) for n in ("a", "b", None)}
    kw = dict(fused_decode=fused)
    expected = {n: Generator(llama, progress=False, **kw).generate_batched([prompt], sps[n])[0].token_ids
                for n in ("b", None)}  # fmt: skip
    with llmspeed.Engine(llama, **kw) as engine:
        gen = engine.generator
        owner, name = (gen.runner, "run") if where == "before" else (llama, "forward_batch")
        original, calls, deleter = getattr(owner, name), [0], []

        def delete_now(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:  # the requests are decoding; another thread deletes "a" now, and may wait for the step
                deleter.append(threading.Thread(target=lora.delete_adapter, args=(llama, "a")))
                deleter[0].start()
                deleter[0].join(0.5)
            return original(*args, **kwargs)

        setattr(owner, name, delete_now)
        handles = {n: engine.submit(prompt, sps[n]) for n in ("a", "b", None)}
        outs = {n: h.result(timeout=60) for n, h in handles.items()}
        deleter[0].join(30)
        assert not deleter[0].is_alive() and lora.adapter_names(llama) == ["b"]
        assert outs["a"].finish_reason == "error" and "adapter 'a' was deleted" in outs["a"].error
        assert {n: (outs[n].finish_reason, outs[n].token_ids) for n in ("b", None)} == {
            n: ("length", expected[n]) for n in ("b", None)}  # fmt: skip
        again = engine.submit(prompt, sps["b"]).result(timeout=60)  # the engine serves on
        assert again.finish_reason == "length" and again.token_ids == expected["b"]
        assert engine.loop_errors == 0


def test_close_names_a_bad_timeout_and_leaves_the_engine_open(llama):
    """Regression: ``close(timeout="x")`` marked the engine closed, then failed in ``join`` with a raw comparison
    TypeError."""
    with llmspeed.Engine(llama) as engine:
        with pytest.raises(ValueError, match="timeout must be None or seconds >= 0; got 'x'"):
            engine.close(timeout="x")
        for bad in (-0.5, float("nan")):  # NaN was taken: the engine closed, then join raised "Invalid value NaN"
            with pytest.raises(ValueError, match=f"timeout must be None or seconds >= 0; got {bad}"):
                engine.close(timeout=bad)
        assert not engine.closed
        assert engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True)).result(timeout=30).token_ids


def test_a_lora_verb_interrupted_while_it_waits_for_the_step_lock_leaves_the_engine_serving(llama):
    """Regression: Ctrl-C in a thread whose ``lora.set_adapter`` waited for the step in flight left its ticket in the
    step lock's queue: no thread could take the lock again, and the engine hung at its next step (its requests never
    ended, and ``close`` timed out)."""
    _random_adapters(llama, ["a"])
    lock = step_lock(llama.module)
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    expected = Generator(llama, progress=False).generate_batched([[1, 2, 3]], sp)[0].token_ids
    with llmspeed.Engine(llama) as engine:
        runner = engine.generator.runner
        original, in_step, go = runner.run, threading.Event(), threading.Event()

        def held_step(*args, **kwargs):
            in_step.set()
            go.wait(30)  # the step (and the lock) is held until the interrupted verb is gone
            return original(*args, **kwargs)

        def interrupted(*args, **kwargs):  # Ctrl-C arriving while the verb waits, its ticket queued behind the step
            assert list(lock._queue) and lock._owner is not None
            raise KeyboardInterrupt

        runner.run = held_step
        handle = engine.submit([1, 2, 3], sp)
        assert in_step.wait(30)
        # the interrupt is raised inside the wait itself: a real SIGINT sent to the main thread from a helper thread
        # failed to interrupt it in two full-suite runs (never alone), so the verb waited out the held step instead
        lock._cv.wait_for = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                lora.set_adapter(llama, "a")
        finally:
            del lock._cv.wait_for
        assert not lock._queue  # the interrupted verb's ticket is gone
        go.set()
        assert handle.result(timeout=30).token_ids == expected
        assert engine.submit([1, 2, 3], sp).result(timeout=30).token_ids == expected
        lora.set_adapter(llama, "a")  # the verb itself runs again
        assert lora.active_adapter(llama) == "a"


def test_per_row_adapters_entered_from_another_thread_mid_step_waits_for_the_step(llama):
    """Regression: ``lora.per_row_adapters`` (and ``per_token_adapters``) set the routing on every layer without the
    model's step lock: entered from another thread while the engine stepped, the step ran with that thread's routing
    and failed its requests, and the two blocks' restores left a stale routing on the layers, failing every later
    request. Now the block waits for the step in flight, and the engine's tokens are exact."""
    _random_adapters(llama, ["a", "b"])
    prompt, sp = [1, 2, 3, 4], SamplingParams(max_new_tokens=10, ignore_eos=True, adapter="b")
    expected = Generator(llama, progress=False, fused_decode=False).generate_batched([prompt], sp)[0].token_ids
    with llmspeed.Engine(llama, fused_decode=False) as engine:
        original, calls, user = llama.forward_batch, [0], []
        inside, leave = threading.Event(), threading.Event()

        def user_block():
            with lora.per_row_adapters(llama, ["a", None]):
                inside.set()
                leave.wait(30)

        def enter_mid_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                user.append(threading.Thread(target=user_block))
                user[0].start()
                inside.wait(0.5)  # entered at once before the fix; now it waits for this step
            try:
                return original(*args, **kwargs)
            finally:
                if calls[0] == 3:
                    leave.set()

        llama.forward_batch = enter_mid_step
        out = engine.submit(prompt, sp).result(timeout=60)
        user[0].join(30)
        assert not user[0].is_alive() and inside.is_set()
        assert (out.finish_reason, out.error, out.token_ids) == ("length", None, expected)
        assert all(layer.routing is None for _, layer in lora.lora_layers(llama))
        assert engine.submit(prompt, sp).result(timeout=60).token_ids == expected


def test_lora_disabled_entered_from_another_thread_mid_step_waits_for_the_step(llama):
    """Regression: ``lora.disabled`` set ``disabled`` on the layers without the model's step lock: entered from another
    thread while the engine stepped, the step in flight ran without the active adapter (on some layers or all), though
    the step had keyed the request's KV by it. Now entering waits for the step, which runs on the active adapter."""
    _random_adapters(llama, ["a"])
    lora.set_adapter(llama, "a")
    prompt, sp = [1, 2, 3, 4], SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = Generator(llama, progress=False, fused_decode=False).generate_batched([prompt], sp)[0].token_ids
    with llmspeed.Engine(llama, fused_decode=False) as engine:
        original, calls, user, seen = llama.forward_batch, [0], [], []
        inside, leave = threading.Event(), threading.Event()

        def user_block():
            with lora.disabled(llama):
                inside.set()
                leave.wait(30)

        def enter_mid_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] != 3:
                return original(*args, **kwargs)
            user.append(threading.Thread(target=user_block))
            user[0].start()
            inside.wait(0.5)  # entered at once before the fix; now it waits for this step
            seen.append(any(layer.disabled for _, layer in lora.lora_layers(llama)))
            try:
                return original(*args, **kwargs)
            finally:
                leave.set()

        llama.forward_batch = enter_mid_step
        out = engine.submit(prompt, sp).result(timeout=60)
        user[0].join(30)
        assert not user[0].is_alive() and seen == [False]
        assert out.finish_reason == "length" and out.token_ids[:3] == expected[:3]  # the third: the step in flight's
        assert not any(layer.disabled for _, layer in lora.lora_layers(llama))
        assert engine.submit(prompt, sp).result(timeout=60).token_ids == expected


def test_finetune_called_from_another_thread_mid_step_waits_for_the_step(llama):
    """Regression: ``lora.finetune`` did not take the model's step lock. Called from another thread while the engine
    stepped, it read the step's adapter routing and refused ("runs a mixed-adapter batch"), or trained under it; and
    the engine's steps ran in its training mode, so requests naming an adapter with dropout failed ("mixed-adapter
    batches are for inference") or sampled from dropped-out deltas. Now training waits for the step in flight, the
    engine for the training, and both succeed, the engine's tokens exact."""
    for name in ("a", "b"):
        lora.add_adapter(llama, name, r=4, alpha=8, dropout=0.3, init="random")
    lora.set_adapter(llama, None)
    prompt, sp = [1, 2, 3, 4], SamplingParams(max_new_tokens=10, ignore_eos=True, adapter="b")
    expected = Generator(llama, progress=False, fused_decode=False).generate_batched([prompt], sp)[0].token_ids
    data = torch.randint(0, llama.spec.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    with llmspeed.Engine(llama, fused_decode=False) as engine:
        original, calls, trainer, results = llama.forward_batch, [0], [], []

        def finetune():
            try:
                results.append(lora.finetune(llama, data, steps=2, seq_len=16, batch_size=2, adapter="a", progress=False))
            except Exception as exc:
                results.append(exc)

        def train_mid_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                trainer.append(threading.Thread(target=finetune))
                trainer[0].start()
                deadline = time.monotonic() + 1  # before the fix it trained now, or failed at once
                while not llama.module.training and not results and time.monotonic() < deadline:
                    time.sleep(0.005)
            return original(*args, **kwargs)

        llama.forward_batch = train_mid_step
        out = engine.submit(prompt, sp).result(timeout=60)
        trainer[0].join(60)
        assert not trainer[0].is_alive() and len(results) == 1 and not isinstance(results[0], Exception), results
        assert (out.finish_reason, out.error, out.token_ids) == ("length", None, expected)
        assert not llama.module.training
        assert engine.submit(prompt, sp).result(timeout=60).token_ids == expected


@pytest.mark.parametrize("verb", ["cast", "quantize", "qat.prepare", "qat.convert"])
def test_model_verbs_wait_for_a_step_in_flight(llama, verb):
    """Regression: ``cast``, ``quantize`` and ``qat.prepare`` / ``convert`` took no step lock, so called from another
    thread while an Engine stepped the model they swapped or cast its weights under the forward in flight (a cast
    between a step and its greedy burst ran the burst on a cache of the old dtype). They now wait for the step."""
    if verb == "qat.convert":
        llmspeed.qat.prepare(llama, "int4", group_size=32)
    run = {"cast": lambda: llmspeed.cast(llama, "bf16"), "quantize": lambda: llmspeed.quantize(llama, "int8"),
           "qat.prepare": lambda: llmspeed.qat.prepare(llama, "int4", group_size=32),
           "qat.convert": lambda: llmspeed.qat.convert(llama)}[verb]  # fmt: skip
    before = {n: type(m) for n, m in llama.module.named_modules()}, llama.spec.dtype
    with step_lock(llama.module):
        worker = threading.Thread(target=run)
        worker.start()
        worker.join(0.3)
        assert worker.is_alive()  # waiting for the step
        assert ({n: type(m) for n, m in llama.module.named_modules()}, llama.spec.dtype) == before
    worker.join(60)
    assert not worker.is_alive()
    assert ({n: type(m) for n, m in llama.module.named_modules()}, llama.spec.dtype) != before


def test_a_base_request_beside_adapter_requests_gets_the_base_models_output(llama, live_server):
    """A request naming no adapter (the server's base model name) on an engine serving adapters gets what the model
    gave before any adapter was added, batched beside requests that name one."""
    from llmspeed.serving.server import OpenAIServer
    from tests.generation.test_engine import ChatTokenizer
    from tests.serving.conftest import openai_client

    llama.tokenizer = ChatTokenizer()
    prompt = [1, 2, 3, 4]
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    before = Generator(llama, progress=False).generate_batched([prompt], sp)[0].token_ids
    before_text = Generator(llama, progress=False).generate_batched(["hello"], SamplingParams(max_new_tokens=6))[0].text
    _random_adapters(llama, ["a", "b"])  # added after the base runs, none active (as `llmspeed serve` leaves them)
    with llmspeed.Engine(llama) as engine:
        handles = {n: engine.submit(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True, adapter=n))
                   for n in ("a", None, "b")}  # fmt: skip
        outs = {n: h.result(timeout=60).token_ids for n, h in handles.items()}
    assert outs[None] == before and outs["a"] != before and outs["b"] != before  # the adapters change the tokens
    with live_server(OpenAIServer(llmspeed.Engine(llama, kv_cache_tokens=1024), "tiny", ("a", "b"))) as url:
        client = openai_client(url)
        texts = [client.completions.create(model=m, prompt="hello", max_tokens=6, temperature=0).choices[0].text
                 for m in ("a", "tiny")]  # fmt: skip
        lora.set_adapter(llama, "a")  # beside served adapters the base model's name runs the base alone, as vLLM
        base = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0).choices[0].text
    assert texts[1] == before_text == base != texts[0]
    with live_server(OpenAIServer(llmspeed.Engine(llama, kv_cache_tokens=1024), "tiny")) as url:  # no adapters served
        as_set = openai_client(url).completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0)
    assert as_set.choices[0].text == texts[0]  # the model as it is set: its active adapter "a"
