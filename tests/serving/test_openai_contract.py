"""The OpenAI API contract as the official ``openai`` client sees it, on a tiny random Llama (fast, CPU): streams,
faults and the server's lifecycle (shutdown, a dead engine, clients that leave), models, adapters, logprobs.

The checks of request fields and values (400s naming the field) are in ``test_openai_validation.py``.
"""

from __future__ import annotations

import json

import httpx
import pytest

from llmspeed import lora
from llmspeed.generation import engine as engine_module
from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer
from tests.generation.test_engine import ChatTokenizer
from tests.serving.conftest import assert_error as _assert_error
from tests.serving.conftest import fail_third_sampling_call, openai_client
from tests.serving.conftest import post_json as _post

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_failure_after_the_stream_began_is_an_error_event_not_a_normal_stop(tiny_server, live_server, monkeypatch, endpoint):
    with live_server(tiny_server) as url:
        client = openai_client(url)
        fail_third_sampling_call(monkeypatch)
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
        client = openai_client(url)
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
        client = openai_client(url)
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


def _stream_chunks(url, path, body):
    """The JSON chunks of a raw streamed response, ``[DONE]`` left out (the client hides a missing key)."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("path, fields", [("/v1/chat/completions", {"messages": CHAT}),
                                          ("/v1/completions", {"prompt": "hi"})])
def test_with_include_usage_every_chunk_carries_usage_null_but_the_last(tiny_server, live_server, path, fields):
    """Regression: OpenAI's API sends ``"usage": null`` on every chunk before the usage chunk when
    ``stream_options.include_usage`` is set; ours left the key out (clients reading ``chunk["usage"]`` broke)."""
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "max_tokens": 3, "min_tokens": 3, "stream": True, "n": 2, **fields}
        chunks = _stream_chunks(url, path, {**body, "stream_options": {"include_usage": True}})
        assert len(chunks) > 2 and all("usage" in c and c["usage"] is None for c in chunks[:-1]), chunks
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        plain = _stream_chunks(url, path, {**body, "stream_options": {"include_usage": False}})
        assert plain and all("usage" not in c for c in plain)  # as OpenAI's: no usage key unless asked for


def test_models_retrieve_and_unknown_paths_answer_in_the_openai_shape(llama, live_server):
    llama.tokenizer = ChatTokenizer()
    lora.add_adapter(llama, "docs", r=2)
    server = OpenAIServer(Engine(llama, kv_cache_tokens=1024), "org/tiny", adapters=("docs",))
    with live_server(server) as url:
        client = openai_client(url)
        listed = client.models.list().data
        assert [m.id for m in listed] == ["org/tiny", "docs"]
        for m in listed:
            assert client.models.retrieve(m.id).model_dump() == m.model_dump()
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve("nope")
        assert err.value.body["code"] == "model_not_found" and "org/tiny" in err.value.body["message"]
        _assert_error(httpx.post(f"{url}/v1/embeddings", json={"model": "org/tiny", "input": "x"}), 404, None)
        _assert_error(httpx.get(f"{url}/v1/chat/completions"), 405, None)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_queued_request_whose_client_left_is_aborted_before_it_runs(llama, live_server, monkeypatch, stream):
    import socket
    import time
    from urllib.parse import urlparse

    real = engine_module.sample_batch
    monkeypatch.setattr(engine_module, "sample_batch", lambda *a, **k: (time.sleep(0.01), real(*a, **k))[1])
    llama.tokenizer = ChatTokenizer()
    server = OpenAIServer(Engine(llama, kv_cache_tokens=4096, max_seqs=1), "tiny")  # one request runs at a time
    engine = server.engine
    with live_server(server) as url:
        busy = engine.submit([1, 2], {"max_new_tokens": 400, "ignore_eos": True})  # at least 4 s of steps
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 5, "stream": stream}).encode()
        where = urlparse(url)
        with socket.create_connection((where.hostname, where.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.time() + 10
            while engine.metrics()["requests_waiting"] == 0 and time.time() < deadline:
                time.sleep(0.01)
            assert engine.metrics()["requests_waiting"] == 1  # queued behind the busy request
        deadline = time.time() + 10  # the client is gone
        while engine.metrics()["requests_waiting"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.metrics()["requests_waiting"] == 0 and not busy.done()  # aborted while still queued
        busy.abort()
        assert busy.result(timeout=10).finish_reason == "abort"


def test_a_top_k_past_the_vocabulary_keeps_every_token(tiny_server, live_server):
    """Regression: ``top_k: 10**20`` failed the step of its batch ("Overflow when unpacking long long"), so it and
    every request sampled with it got an error; it keeps every token, as ``top_k: 0``."""
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "min_tokens": 4, "seed": 3}
        huge = _post(url, "/v1/completions", {**body, "top_k": 10**20})
        assert huge.status_code == 200, huge.text
        assert huge.json()["choices"][0]["text"] == _post(url, "/v1/completions", body).json()["choices"][0]["text"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_step_that_fails_before_the_first_token_is_a_500_not_the_clients_fault(tiny_server, live_server, monkeypatch,
                                                                                  stream):
    """Regression: a fault in the step that computes a request's first token (the model, the sampler, out of memory)
    was answered 400 ``invalid_request_error``, as if the request were bad: clients do not retry a 400."""
    with live_server(tiny_server) as url:
        def broken(*args, **kwargs):
            raise RuntimeError("injected sampler fault")

        monkeypatch.setattr(engine_module, "sample_batch", broken)
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": stream}
        r = _post(url, "/v1/completions", body)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        assert "injected sampler fault" in r.json()["error"]["message"]
        monkeypatch.undo()
        assert _post(url, "/v1/completions", body).status_code == 200  # the server keeps serving
        _assert_error(_post(url, "/v1/completions", {**body, "prompt": [999]}), 400, "prompt")  # a bad request still is


class ByteFallbackTokenizer:
    """SentencePiece with byte fallback in miniature: a token per character, ``<0xNN>`` tokens for the bytes of the
    others (``ord`` 1000 + byte), each of which decodes alone to ``"\\ufffd"``."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return b"".join(bytes([i - 1000]) if i >= 1000 else chr(i).encode() for i in ids).decode("utf-8", "replace")

    def convert_ids_to_tokens(self, i: int) -> str:
        return f"<0x{i - 1000:02X}>" if i >= 1000 else chr(i)


def _byte_level_tokenizer():
    """A real byte-level BPE tokenizer (GPT-2's alphabet, no merges), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("kind", ["byte-level BPE", "byte fallback"])
def test_chat_logprobs_bytes_are_the_tokens_utf8_bytes_that_join_to_the_text(kind):
    """Regression: a token holding part of a multi-byte character decodes alone to "\\ufffd", and ``bytes`` was
    that character's UTF-8 ([239, 191, 189]) for every such token; OpenAI's ``bytes`` are the token's own, so that
    a client joining them gets the text back (SmolLM2 writes CJK and emoji this way)."""
    from llmspeed.generation.sampling import TokenLogprobs
    from llmspeed.serving.openai_responses import chat_logprobs

    text = "日本 café 🎉 ok"
    if kind == "byte fallback":
        tokenizer = ByteFallbackTokenizer()
        ids = [ord(c) if c.isascii() else 1000 + b for c in text for b in (c.encode() if not c.isascii() else b"x")]
    else:
        tokenizer = _byte_level_tokenizer()
        ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and "\ufffd" in tokenizer.decode(ids[:1])
    content = chat_logprobs(tokenizer, [TokenLogprobs(i, -1.0, ((i, -1.0),)) for i in ids])["content"]
    assert bytes(b for e in content for b in e["bytes"]).decode("utf-8") == text
    assert all(e["top_logprobs"][0]["bytes"] == e["bytes"] for e in content)
    assert [e["bytes"] for e in content if e["token"] == "o"] == [[111]]  # whole characters: their own UTF-8


def test_an_api_key_guards_the_api_but_not_health_or_metrics(llama, live_server):
    """Regression: ``--api-key`` also answered 401 to ``/health`` and ``/metrics``, so a load balancer's health probe
    (which sends no key) marked the server down; vLLM guards only ``/v1``."""
    from llmspeed.serving import Engine
    from llmspeed.serving.server import OpenAIServer
    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    with live_server(OpenAIServer(Engine(llama, kv_cache_tokens=1024), "tiny", api_key="sekret")) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert "llmspeed_kv_blocks_used" in httpx.get(f"{url}/metrics").text
        for path in ("/v1/models", "/v1/models/tiny"):
            assert httpx.get(f"{url}{path}").status_code == 401
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer sekret"}).status_code == 200
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        assert httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer x"}).status_code == 401


def test_health_answers_head_as_get(tiny_server, live_server):
    """Regression: ``HEAD /health`` (``curl --head``, a load balancer's HEAD probe) was a 405, so the probe marked a
    healthy server down; it answers as ``GET`` does (vLLM's too), without a body, and 503 once the engine is closed."""
    with live_server(tiny_server) as url:
        head = httpx.head(f"{url}/health")
        assert head.status_code == 200 and head.content == b""
        tiny_server.engine.close()
        assert httpx.head(f"{url}/health").status_code == httpx.get(f"{url}/health").status_code == 503


def test_a_dead_engine_fails_the_requests_in_flight_and_health_says_so(llama, live_server, monkeypatch):
    """Regression: when the engine thread died (an exception it cannot survive), a request in flight never got an
    answer (the client waited for its timeout), new requests were accepted and hung too, and ``/health`` still said
    ``ok``, so a load balancer kept the dead server in rotation. Now the requests in flight fail with a 500 naming the
    death (a stream with an error event), new ones get a 503, and ``/health`` answers 503, as vLLM's does."""
    import threading
    import time

    class Fatal(BaseException):
        pass

    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    llama.tokenizer = ChatTokenizer()
    server = OpenAIServer(Engine(llama, kv_cache_tokens=1024), "tiny")
    real_step, gate = server.engine.generator.step, threading.Event()

    def step():
        if gate.is_set():
            raise Fatal("the engine died")
        time.sleep(0.01)  # both requests are still running when the engine dies
        return real_step()

    monkeypatch.setattr(server.engine.generator, "step", step)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 400, "min_tokens": 400}
    with live_server(server) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=10) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
            results = []
            whole = threading.Thread(target=lambda: results.append(_post(url, "/v1/completions", body)))
            whole.start()
            deadline = time.time() + 10
            while server.engine.metrics()["requests_running"] < 2 and time.time() < deadline:
                time.sleep(0.01)
            gate.set()
            tail = [line for line in lines if line.startswith("data: ")]
        whole.join(10)
        assert not whole.is_alive()  # waited forever before the fix
        assert "the engine died" in _assert_error(results[0], 500, None)
        assert "the engine died" in json.loads(tail[-2][len("data: "):])["error"]["message"] and tail[-1] == "data: [DONE]"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "the engine died" in health.json()["error"]
        assert "the engine died" in _assert_error(_post(url, "/v1/completions", body), 503, None)


@pytest.mark.parametrize("adapters", [("tiny",), ("docs", "docs")], ids=["base-name", "twice"])
def test_an_adapter_named_as_the_base_or_twice_is_refused(llama, adapters):
    """Regression: an adapter named as the base model (``--served-model-name docs --adapter docs=...``) was listed
    twice by ``/v1/models``, both entries ``parent: null``, and every request for that name ran the base model: the
    adapter could not be reached. A name listed twice was listed twice. Both are now a ``ValueError`` at construction."""
    lora.add_adapter(llama, "docs", r=2)
    lora.add_adapter(llama, "tiny", r=2)
    engine = Engine(llama, kv_cache_tokens=1024)
    try:
        with pytest.raises(ValueError, match="base model|unique"):
            OpenAIServer(engine, "tiny", adapters)
    finally:
        engine.close()


def test_an_adapter_not_loaded_on_the_model_is_refused(llama):
    """Regression: the server listed adapters it was given without checking the model carried them; /v1/models
    showed one, and every request for it failed with a 400 from the generator."""
    lora.add_adapter(llama, "docs", r=2)
    engine = Engine(llama, kv_cache_tokens=1024)
    try:
        with pytest.raises(ValueError, match=r"got \['sql'\], which it does not carry \(it has \['docs'\]\)"):
            OpenAIServer(engine, "tiny", ("docs", "sql"))
        assert OpenAIServer(engine, "tiny", ("docs",)).adapters == ("docs",)
    finally:
        engine.close()


def test_completions_top_logprobs_hold_the_sampled_token_as_openai_and_vllm(tiny_server, live_server):
    """Regression: ``logprobs: 0`` gave ``{}`` for every token's ``top_logprobs``, and a sampled token outside the top
    ``logprobs`` was missing there; OpenAI returns "up to logprobs+1 elements", the sampled token always among them."""
    with live_server(tiny_server) as url:
        client = openai_client(url)
        for n in (0, 1):
            lp = client.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=1.5, seed=3,
                                           logprobs=n).choices[0].logprobs  # fmt: skip
            for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
                assert top[token] == value and len(top) <= n + 1
