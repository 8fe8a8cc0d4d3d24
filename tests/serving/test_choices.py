"""Requests for ``n > 1`` choices: a choice that fails (or a shutdown) ends every sibling, never a partial answer."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from llmspeed.generation import engine as engine_module
from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer
from tests.generation.test_engine import ChatTokenizer


@pytest.fixture
def tiny_server(llama):
    """An OpenAIServer named "tiny" over a tiny random Llama with a byte-level chat tokenizer."""
    llama.tokenizer = ChatTokenizer()
    return OpenAIServer(Engine(llama, kv_cache_tokens=4096), "tiny")


def _slow_steps(monkeypatch) -> None:
    """Every sampling call takes at least 10 ms, so a 400-token request is still running seconds later."""
    real = engine_module.sample_batch
    monkeypatch.setattr(engine_module, "sample_batch", lambda *a, **k: (time.sleep(0.01), real(*a, **k))[1])


def _handles(server, monkeypatch) -> list:
    """The handles ``server`` submits from now on, in submission order (choice order)."""
    handles, real = [], server._submit

    def submit(prompt, sp):
        handles.append(real(prompt, sp))
        return handles[-1]

    monkeypatch.setattr(server, "_submit", submit)
    return handles


def _until(condition, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    return condition()


def test_one_choice_ending_without_an_answer_aborts_its_siblings(tiny_server, live_server, monkeypatch):
    _slow_steps(monkeypatch)
    handles = _handles(tiny_server, monkeypatch)
    engine = tiny_server.engine
    with live_server(tiny_server) as url:  # 400 steps of at least 10 ms: the siblings would run for 4 s
        answer, body = [], {"model": "tiny", "prompt": "hi", "n": 3, "max_tokens": 400, "min_tokens": 400}
        asker = threading.Thread(target=lambda: answer.append(_post(url, "/v1/completions", body)))
        asker.start()
        assert _until(lambda: len(handles) == 3 and engine.tokens_generated >= 3)
        handles[1].abort()  # what a failure of that choice alone looks like to the server
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


def test_the_engine_closing_between_the_choices_submits_aborts_those_submitted(tiny_server, live_server, monkeypatch):
    _slow_steps(monkeypatch)
    engine, handles, real = tiny_server.engine, [], tiny_server._submit

    def submit(prompt, sp):
        if handles:
            engine.close()  # after the first choice was submitted: the second finds the engine closed
        handles.append(real(prompt, sp))
        return handles[-1]

    monkeypatch.setattr(tiny_server, "_submit", submit)
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "prompt": "hi", "n": 3, "max_tokens": 400, "min_tokens": 400}
        r = _post(url, "/v1/completions", body)
        assert r.status_code == 503 and r.json()["error"]["message"] == "the engine is closed"
        assert len(handles) == 1 and handles[0].result(timeout=10).finish_reason == "abort"


def _post(url, path, body):
    return httpx.post(f"{url}{path}", json=body, timeout=60)
