"""The OpenAI API contract as the official ``openai`` client sees it, on a tiny random Llama (fast, CPU)."""

from __future__ import annotations

import pytest

from llmspeed.generation import engine as engine_module
from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer
from tests.generation.test_engine import ChatTokenizer

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def tiny_server(llama):
    """An OpenAIServer named "tiny" over a tiny random Llama with a byte-level chat tokenizer."""
    llama.tokenizer = ChatTokenizer()
    return OpenAIServer(Engine(llama, kv_cache_tokens=4096), "tiny")


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def _fail_third_sampling_call(monkeypatch):
    real, calls = engine_module.sample_batch, [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected sampler fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "sample_batch", flaky)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_failure_after_the_stream_began_is_an_error_event_not_a_normal_stop(tiny_server, live_server, monkeypatch, endpoint):
    with live_server(tiny_server) as url:
        client = _client(url)
        _fail_third_sampling_call(monkeypatch)
        kw = dict(model="tiny", max_tokens=10, stream=True, extra_body={"min_tokens": 10})
        if endpoint == "chat":
            stream = client.chat.completions.create(messages=CHAT, **kw)
        else:
            stream = client.completions.create(prompt="hi", **kw)
        seen = []
        with pytest.raises(openai.APIError, match="injected sampler fault"):
            for chunk in stream:
                seen.append(chunk)
        assert seen and all(c.choices[0].finish_reason is None for c in seen if c.choices)
        monkeypatch.undo()
        after = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, extra_body={"min_tokens": 3})
        assert after.choices[0].finish_reason == "length"  # the server keeps serving


def test_a_request_aborted_by_shutdown_is_an_error_not_a_normal_stop(tiny_server, live_server, monkeypatch):
    import threading
    import time

    real = engine_module.sample_batch
    monkeypatch.setattr(engine_module, "sample_batch", lambda *a, **k: (time.sleep(0.01), real(*a, **k))[1])
    with live_server(tiny_server) as url:  # 400 steps of at least 10 ms: still running when close() comes
        client = _client(url)
        stream = client.completions.create(model="tiny", prompt="hi", max_tokens=400, stream=True,
                                           extra_body={"min_tokens": 400})
        first = next(iter(stream))
        assert first.choices[0].finish_reason is None
        closer = threading.Thread(target=tiny_server.engine.close)
        closer.start()
        with pytest.raises(openai.APIError, match="aborted"):
            for _ in stream:
                pass
        closer.join(30)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert err.value.status_code == 503


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_logprobs_are_the_ones_a_whole_response_gives(tiny_server, live_server, endpoint):
    with live_server(tiny_server) as url:
        client = _client(url)
        if endpoint == "chat":
            kw = dict(model="tiny", messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                      extra_body={"min_tokens": 5})
            whole = client.chat.completions.create(**kw).choices[0].logprobs.content
            streamed = [t for c in client.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                        for t in c.choices[0].logprobs.content]
            assert len(whole) == 5 and [t.model_dump() for t in streamed] == [t.model_dump() for t in whole]
        else:
            kw = dict(model="tiny", prompt="hi", max_tokens=5, temperature=0, logprobs=2, extra_body={"min_tokens": 5})
            whole = client.completions.create(**kw).choices[0].logprobs
            parts = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw)
                     if c.choices and c.choices[0].logprobs]
            assert len(whole.tokens) == 5 and len(parts) == 5
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                assert [v for p in parts for v in getattr(p, key)] == getattr(whole, key), key
