"""Requests for ``n > 1`` choices, streamed or whole: each choice as a request of its own would give it, and a
choice that fails (or a shutdown, or a client that leaves) ends every sibling, never a partial answer."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from llmspeed.generation import engine as engine_module
from tests.serving.conftest import fail_third_sampling_call, openai_client

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "hi"}]


def _slow_steps(monkeypatch) -> None:
    """Every sampling call takes at least 10 ms, so a 400-token request is still running seconds later."""
    real = engine_module.sample_batch
    monkeypatch.setattr(engine_module, "sample_batch", lambda *a, **k: (time.sleep(0.01), real(*a, **k))[1])


def _handles(server, monkeypatch) -> list:
    """The handles ``server`` submits from now on, in submission order (choice order)."""
    handles, real = [], server._submit_all

    def submit_all(requests, priority=0):
        handles.extend(real(requests, priority))
        return handles[-len(requests):]

    monkeypatch.setattr(server, "_submit_all", submit_all)
    return handles


def _until(condition, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    return condition()


def _by_choice(chunks, field: str) -> dict[int, str]:
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            piece = choice.delta.content if field == "delta" else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
    return texts


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_choices_interleave_and_each_is_the_whole_answers_choice(tiny_server, live_server, endpoint):
    with live_server(tiny_server) as url:
        client = openai_client(url)
        if endpoint == "chat":
            create = client.chat.completions.create
            kw = dict(model="tiny", messages=CHAT, logprobs=True, top_logprobs=2)
        else:
            create = client.completions.create
            kw = dict(model="tiny", prompt="hi", logprobs=2)
        kw.update(n=3, seed=11, temperature=1.0, max_tokens=6, extra_body={"min_tokens": 6})
        whole = create(**kw)
        chunks = list(create(stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[-1].usage == whole.usage and not chunks[-1].choices
        assert whole.usage.completion_tokens == 18 and whole.usage.prompt_tokens == 2  # the prompt counted once
        assert all(len(c.choices) == 1 for c in chunks[:-1])
        order = [c.choices[0].index for c in chunks[:-1]]
        assert sorted(set(order)) == [0, 1, 2] and order != sorted(order)  # the choices' chunks interleave
        texts = _by_choice(chunks, "delta" if endpoint == "chat" else "text")
        ends = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks[:-1] if c.choices[0].finish_reason]
        assert sorted(ends) == [(i, "length") for i in range(3)]  # one finish_reason per choice
        for i, choice in enumerate(whole.choices):
            assert choice.index == i
            assert texts[i] == (choice.message.content if endpoint == "chat" else choice.text)
            mine = [c.choices[0].logprobs for c in chunks[:-1] if c.choices[0].index == i and c.choices[0].logprobs]
            if endpoint == "chat":
                assert [t.model_dump() for p in mine for t in p.content] == [t.model_dump() for t in choice.logprobs.content]
            else:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):  # offsets count per choice
                    assert [v for p in mine for v in getattr(p, key)] == getattr(choice.logprobs, key), key
        assert len(set(texts.values())) == 3  # consecutive seeds: three different answers


def test_a_choice_failing_mid_stream_ends_the_stream_with_an_error_and_leaves_nothing_running(tiny_server, live_server,
                                                                                            monkeypatch):
    engine = tiny_server.engine
    with live_server(tiny_server) as url:
        client = openai_client(url)
        fail_third_sampling_call(monkeypatch)
        stream = client.chat.completions.create(model="tiny", messages=CHAT, n=3, max_tokens=10, stream=True,
                                                stream_options={"include_usage": True}, extra_body={"min_tokens": 10})
        seen = []
        with pytest.raises(openai.APIError, match="injected sampler fault"):
            for chunk in stream:
                seen.append(chunk)
        assert {c.choices[0].index for c in seen} == {0, 1, 2}
        assert all(c.choices[0].finish_reason is None and c.usage is None for c in seen)
        assert _until(lambda: engine.generator.num_live == 0) and engine.metrics()["requests_running"] == 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_one_choice_ending_without_an_answer_aborts_its_siblings(tiny_server, live_server, monkeypatch, stream):
    _slow_steps(monkeypatch)
    handles = _handles(tiny_server, monkeypatch)
    engine = tiny_server.engine
    with live_server(tiny_server) as url:  # 400 steps of at least 10 ms: the siblings would run for 4 s
        kw = dict(model="tiny", prompt="hi", n=3, max_tokens=400, extra_body={"min_tokens": 400})
        if stream:
            chunks = iter(openai_client(url).completions.create(stream=True, **kw))
            assert next(chunks).choices[0].finish_reason is None
            handles[1].abort()  # what a failure of that choice alone looks like to the server
            with pytest.raises(openai.APIError, match="aborted"):
                for _ in chunks:
                    pass
        else:
            answer, body = [], {"model": "tiny", "prompt": "hi", "n": 3, "max_tokens": 400, "min_tokens": 400}
            asker = threading.Thread(target=lambda: answer.append(_post(url, "/v1/completions", body)))
            asker.start()
            assert _until(lambda: len(handles) == 3 and engine.tokens_generated >= 3)
            handles[1].abort()
            asker.join(30)
            assert answer[0].status_code == 503 and "aborted" in answer[0].json()["error"]["message"]
        outputs = [h.result(timeout=10) for h in handles]
        assert [o.finish_reason for o in outputs] == ["abort"] * 3
        assert all(len(o.token_ids) < 400 for o in outputs)  # the siblings were aborted, not left to finish
        assert _until(lambda: engine.generator.num_live == 0)


def test_closing_the_engine_under_n_choices_is_a_503_never_a_partial_answer(tiny_server, live_server, monkeypatch):
    _slow_steps(monkeypatch)
    handles = _handles(tiny_server, monkeypatch)
    engine = tiny_server.engine
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "prompt": "hi", "n": 3, "max_tokens": 400, "min_tokens": 400}
        answer = []
        asker = threading.Thread(target=lambda: answer.append(_post(url, "/v1/completions", body)))
        asker.start()
        assert _until(lambda: len(handles) == 3 and engine.tokens_generated >= 3)
        engine.close()
        asker.join(30)
        assert answer[0].status_code == 503 and "shutting down" in answer[0].json()["error"]["message"]
        assert [h.result(timeout=10).finish_reason for h in handles] == ["abort"] * 3


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_the_choices_are_queued_all_or_none(tiny_server, live_server, monkeypatch, stream):
    """The engine closing while a request's choices are submitted: none is queued (they go in one command), so none
    is left running, and the answer is a 503. (Before, choices were queued one by one and those queued before the
    close had to be aborted.)"""
    engine, real = tiny_server.engine, tiny_server.engine._submit_all
    queued = []

    def submit_all(requests, loop, priority=0):
        engine.close()  # between the request's validation and its choices' submission
        queued.extend(real(requests, loop, priority))
        return queued

    monkeypatch.setattr(engine, "_submit_all", submit_all)
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "prompt": "hi", "n": 3, "max_tokens": 400, "min_tokens": 400, "stream": stream}
        r = _post(url, "/v1/completions", body)
        assert r.status_code == 503 and r.json()["error"]["message"] == "the engine is closed"
        assert queued == [] and engine._inbox == [] and engine.generator.num_live == 0


def test_a_client_leaving_a_stream_of_n_choices_aborts_every_choice(tiny_server, live_server, monkeypatch):
    _slow_steps(monkeypatch)
    handles = _handles(tiny_server, monkeypatch)
    engine = tiny_server.engine
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "messages": CHAT, "n": 3, "max_tokens": 400, "min_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            seen = set()
            for line in resp.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    seen.add(json.loads(line[6:])["choices"][0]["index"])
                if seen == {0, 1, 2}:
                    break  # leave with every choice running
        outputs = [h.result(timeout=10) for h in handles]
        assert [o.finish_reason for o in outputs] == ["abort"] * 3 and all(len(o.token_ids) < 400 for o in outputs)
        assert _until(lambda: engine.generator.num_live == 0)


def test_refused_before_any_token_n_choices_stream_is_a_plain_400(tiny_server, live_server):
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "prompt": "x" * 5000, "n": 2, "max_tokens": 2, "stream": True}
        r = _post(url, "/v1/completions", body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert _until(lambda: tiny_server.engine.generator.num_live == 0)


def _post(url, path, body):
    return httpx.post(f"{url}{path}", json=body, timeout=60)
