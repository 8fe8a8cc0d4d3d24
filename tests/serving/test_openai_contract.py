"""The OpenAI API contract as the official ``openai`` client sees it, on a tiny random Llama (fast, CPU)."""

from __future__ import annotations

import json

import httpx
import pytest

from llmspeed import lora
from llmspeed.generation import engine as engine_module
from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer
from tests.generation.test_engine import ChatTokenizer
from tests.serving.conftest import fail_third_sampling_call, openai_client

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


def _post(url, path, body):
    content = json.dumps(body)  # writes float("inf") as Infinity, which Python's json (the server's) reads back
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)


def _assert_error(r, status, param):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status == 400 else error["type"])
    assert error["param"] == param, error
    return error["message"]


WRONG_TYPES = [  # (field, value, extra fields, param OpenAI's API names): a lax parse accepted each of these
    ("temperature", "0.5", {}, "temperature"),
    ("n", "2", {}, "n"),
    ("n", 2.0, {}, "n"),
    ("max_tokens", 5.0, {}, "max_tokens"),
    ("max_completion_tokens", "5", {}, "max_completion_tokens"),
    ("seed", "7", {}, "seed"),
    ("stream", "true", {}, "stream"),
    ("logprobs", 1, {}, "logprobs"),
    ("top_p", True, {}, "top_p"),
    ("stream_options", {"include_usage": "false"}, {"stream": True}, "stream_options.include_usage"),
    ("stream_options", {"include_usages": True}, {"stream": True}, "stream_options.include_usages"),
]


@pytest.mark.parametrize("field,value,extra,param", WRONG_TYPES, ids=[f"{c[0]}={c[1]!r}" for c in WRONG_TYPES])
def test_wrong_types_are_400_naming_the_field_not_coerced(tiny_server, live_server, field, value, extra, param):
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 2, **extra, field: value}
        message = _assert_error(_post(url, "/v1/chat/completions", body), 400, param)
        assert repr(value if not isinstance(value, dict) else next(iter(value.values()))) in message
        ok = _post(url, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 2, "temperature": 1})
        assert ok.status_code == 200  # an int is a valid number


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_null_for_a_field_with_a_default_is_its_default(tiny_server, live_server, endpoint):
    """Regression: OpenAI's API types these fields "number or null" (the ``openai`` client sends ``temperature=None``
    as ``null``), and vLLM takes ``null`` as the default; this server answered 400 ``Input should be a valid number``."""
    with live_server(tiny_server) as url:
        client = openai_client(url)
        if endpoint == "chat":
            create, path, kw = client.chat.completions.create, "/v1/chat/completions", dict(messages=CHAT, logprobs=None)
        else:
            create, path, kw = client.completions.create, "/v1/completions", dict(prompt="hi", echo=None, best_of=None)
        plain = create(model="tiny", max_tokens=4, seed=3, **kw)
        nulls = create(model="tiny", max_tokens=4, seed=3, temperature=None, top_p=None, n=None, stream=None,
                       presence_penalty=None, frequency_penalty=None, **kw,
                       extra_body={"top_k": None, "repetition_penalty": None, "min_tokens": None})
        assert len(nulls.choices) == 1 and nulls.choices[0].model_dump() == plain.choices[0].model_dump()
        body = {"model": "tiny", "max_tokens": 2, **({"messages": CHAT} if endpoint == "chat" else {"prompt": "hi"})}
        for field in body:  # a required field stays required
            if field != "max_tokens":
                _assert_error(_post(url, path, {**body, field: None}), 400, field)


def test_best_of_fewer_than_n_is_a_400_naming_it(tiny_server, live_server):
    """Regression: ``best_of=1`` with ``n=2`` (two choices out of one candidate) answered two choices; OpenAI and
    vLLM refuse it, naming ``best_of``."""
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "best_of": 1}
        assert "best_of must be at least n=2; got 1" in _assert_error(_post(url, "/v1/completions", {**body, "n": 2}),
                                                                      400, "best_of")
        assert len(_post(url, "/v1/completions", body).json()["choices"]) == 1


def test_stream_options_need_stream_true(tiny_server, live_server):
    with live_server(tiny_server) as url:
        client = openai_client(url)
        with pytest.raises(openai.BadRequestError, match="stream_options") as err:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, stream_options={"include_usage": True})
        assert err.value.body["param"] == "stream_options"
        chunks = list(client.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=True,
                                                stream_options={"include_usage": False}, extra_body={"min_tokens": 2}))
        assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"



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


BAD_VALUES = [  # (path, body fields, param, what the message must hold: the value given and what is accepted)
    ("/v1/chat/completions", {"stop": ["a", 3]}, "stop.1", ["(got 3)", "a string or a list of strings"]),
    ("/v1/chat/completions", {"stop": 5}, "stop", ["(got 5)", "a string or a list of strings"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
     ["(got 5)", "a string or a list of content parts"]),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt.1", ["(got 'a')", "a list of token ids"]),
    ("/v1/completions", {"prompt": 5}, "prompt", ["(got 5)", "a string, a list of token ids"]),
    ("/v1/chat/completions", {"repetition_penalty": float("inf")}, "repetition_penalty", ["got inf", "finite"]),
]


@pytest.mark.parametrize("path,fields,param,holds", BAD_VALUES, ids=[c[2] for c in BAD_VALUES])
def test_a_value_no_member_of_a_union_takes_names_the_field_and_what_it_accepts(tiny_server, live_server, path, fields,
                                                                                   param, holds):
    base = {"model": "tiny", "max_tokens": 2, **({"messages": CHAT} if "chat" in path else {"prompt": "hi"})}
    with live_server(tiny_server) as url:
        message = _assert_error(_post(url, path, {**base, **fields}), 400, param)
        assert all(h in message for h in holds), message


def test_a_message_without_content_is_refused_except_an_assistant_turn(tiny_server, live_server):
    with live_server(tiny_server) as url:
        for messages, param in (([{"role": "user"}], "messages.0.content"),
                                ([{"role": "system", "content": None}, *CHAT], "messages.0.content"),
                                ([*CHAT, {"role": "assistant", "content": "a"}, {"role": "tool"}], "messages.2.content")):
            body = {"model": "tiny", "messages": messages, "max_tokens": 2}
            assert "required" in _assert_error(_post(url, "/v1/chat/completions", body), 400, param)
        messages = [*CHAT, {"role": "assistant", "content": None}, {"role": "user", "content": "go on"}]
        ok = openai_client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        assert ok.usage.prompt_tokens == len("higo on")  # the byte-level template: the turns' text


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


PARTS = [  # (content parts, param): a lax read wrote the text None as "None", 5 as "5", a missing text as ""
    ([{"type": "text", "text": None}], "messages.0.content.0.text"),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": 5}], "messages.0.content.1.text"),
    ([{"type": "text"}], "messages.0.content.0.text"),
    ([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}], "messages.0.content.1.type"),
]


@pytest.mark.parametrize("parts,param", PARTS, ids=["null-text", "int-text", "no-text", "image"])
def test_a_content_part_without_string_text_is_a_400_naming_it(tiny_server, live_server, parts, param):
    """Regression: a text part's ``text`` was read with ``str()``: ``null`` reached the model as the prompt "None"."""
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
        message = _assert_error(_post(url, "/v1/chat/completions", body), 400, param)
        assert "image_url" in message if param.endswith("type") else "must be a string" in message
        ok = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]}
        assert openai_client(url).chat.completions.create(**ok).usage.prompt_tokens == len("h\ni")  # parts: "\n"-joined


def test_a_body_nested_too_deeply_is_a_400_not_a_500(tiny_server, live_server):
    """Regression: ``json.loads`` raised ``RecursionError`` on ``[[[[...`` (100000 deep): a 500 ``server_error``, and
    a traceback in the server's log for every such request."""
    with live_server(tiny_server) as url:
        for raw in ("[" * 100000, '{"model": "tiny", "prompt": "hi", "user": ' + "[" * 5000 + "]" * 5000 + "}"):
            r = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert "nested too deeply" in _assert_error(r, 400, None)
        assert _post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_number_too_long_to_read_is_a_400_not_a_500(tiny_server, live_server):
    """Regression: an integer of more than 4300 digits (``"n": 1000...``) makes ``json.loads`` raise a plain
    ``ValueError`` (Python's limit on int conversion), which was answered 500 ``server_error``."""
    with live_server(tiny_server) as url:
        raw = '{"model": "tiny", "prompt": "hi", "n": 1' + "0" * 5000 + "}"
        r = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert "not valid JSON" in _assert_error(r, 400, None) and "digits" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_prompt_refused_by_the_engine_is_a_400_naming_prompt_or_messages(tiny_server, live_server, stream):
    """Regression: a prompt longer than the context, token ids outside the vocabulary or an empty chat were answered
    400 with ``param: null``; OpenAI's API names the field (``messages`` for a chat past the context)."""
    with live_server(tiny_server) as url:
        for path, fields, param, says in [
            ("/v1/completions", {"prompt": "x" * 600}, "prompt", "context"),
            ("/v1/completions", {"prompt": [999]}, "prompt", "token ids"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 600}]}, "messages", "context"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages", "empty"),
        ]:
            body = {"model": "tiny", "max_tokens": 2, "stream": stream, **fields}
            assert says in _assert_error(_post(url, path, body), 400, param)


def test_min_tokens_above_an_explicit_max_tokens_is_a_400_naming_it(tiny_server, live_server):
    """Regression: ``min_tokens`` 5 with ``max_tokens`` 2 was cut down to 2 without a word (vLLM answers 400), and
    so was one above a default ``max_tokens`` or an explicit ``max_completion_tokens``."""
    with live_server(tiny_server) as url:
        for path, body in [("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
            r = _post(url, path, {"model": "tiny", **body, "max_tokens": 2, "min_tokens": 5})
            assert "min_tokens must be at most max_tokens=2; got 5" in _assert_error(r, 400, "min_tokens")
            ok = _post(url, path, {"model": "tiny", **body, "max_tokens": 3, "min_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        # the defaults bound it too (it was cut to the default silently): completions' 16, chat's
        # max_completion_tokens
        r = _post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "min_tokens": 20})
        assert "min_tokens must be at most max_tokens=16; got 20" in _assert_error(r, 400, "min_tokens")
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2}
        r = _post(url, "/v1/chat/completions", {**chat, "min_tokens": 5})
        assert "min_tokens must be at most max_completion_tokens=2; got 5" in _assert_error(r, 400, "min_tokens")


def test_min_tokens_is_bounded_by_max_completion_tokens_when_both_limits_are_given(tiny_server, live_server):
    """Regression: with ``max_tokens`` and ``max_completion_tokens`` both given, ``max_completion_tokens`` is the limit
    used (as vLLM), but ``min_tokens`` was checked against ``max_tokens``: ``max_tokens`` 2, ``max_completion_tokens``
    10, ``min_tokens`` 5 was a 400 "at most max_tokens=2", and the 400 for ``max_completion_tokens`` 2 named
    ``max_tokens=2``, a field the client set to 10."""
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "messages": CHAT, "min_tokens": 5}
        ok = _post(url, "/v1/chat/completions", {**body, "max_tokens": 2, "max_completion_tokens": 10})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 5, ok.text
        r = _post(url, "/v1/chat/completions", {**body, "max_tokens": 10, "max_completion_tokens": 2})
        assert "min_tokens must be at most max_completion_tokens=2; got 5" in _assert_error(r, 400, "min_tokens")


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


@pytest.mark.parametrize("endpoint, param", [("completions", "max_tokens"), ("chat", "max_tokens"),
                                             ("chat", "max_completion_tokens")])  # fmt: skip
def test_max_tokens_past_the_context_is_a_400_not_a_silent_cut(tiny_server, live_server, endpoint, param):
    """Regression: a ``max_tokens`` above what the context leaves after the prompt was accepted and the answer cut
    at the context, where vLLM and OpenAI answer 400."""
    limit = tiny_server.engine.generator.scheduler.max_tokens_per_seq
    with live_server(tiny_server) as url:
        client = openai_client(url)

        def ask(n):
            if endpoint == "chat":
                return client.chat.completions.create(model="tiny", messages=CHAT, **{param: n})
            return client.completions.create(model="tiny", prompt="hi", max_tokens=n)

        with pytest.raises(openai.BadRequestError, match=rf"{param}={limit} is too large: this model holds {limit}"):
            ask(limit)
        fits = ask(3)
        assert fits.choices[0].finish_reason in ("length", "stop") and fits.usage.completion_tokens <= 3
        if endpoint == "chat":  # no max_tokens: the rest of the context, as before
            assert client.chat.completions.create(model="tiny", messages=CHAT).choices[0].finish_reason


def test_max_completion_tokens_past_the_context_is_named_even_beside_max_tokens(tiny_server, live_server):
    """Regression: with both given, ``max_completion_tokens`` is the one used (as vLLM), but the 400 for it past the
    context named ``max_tokens`` with ``max_completion_tokens``' value: a field and a value the client never sent."""
    limit = tiny_server.engine.generator.scheduler.max_tokens_per_seq
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "max_completion_tokens": limit}
        message = _assert_error(_post(url, "/v1/chat/completions", body), 400, "max_completion_tokens")
        assert message.startswith(f"max_completion_tokens={limit} is too large")


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


def test_a_negative_seed_is_taken_as_vllm_takes_it(tiny_server, live_server):
    """Regression: ``seed: -1`` (an int64, which vLLM accepts) was a 400; it is now the seed ``2**64 - 1``."""
    with live_server(tiny_server) as url:
        client = openai_client(url)

        def text(seed):
            return client.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=1.5,
                                             seed=seed).choices[0].text  # fmt: skip

        assert text(-1) == text(2**64 - 1) == text(-1)
        with pytest.raises(openai.BadRequestError, match="seed"):
            text(-(2**63) - 1)


def test_openais_fields_that_change_nothing_here_are_taken_as_vllm_takes_them(tiny_server, live_server):
    """Regression: ``parallel_tool_calls``, ``store: false``, ``metadata``, ``service_tier`` and ``modalities: ["text"]``
    (fields of OpenAI's API that clients send, which vLLM takes and ignores) were a 400 "Extra inputs are not
    permitted"; what this server cannot honour (``store: true``, audio) stays a 400 naming the field."""
    with live_server(tiny_server) as url:
        client = openai_client(url)
        kw = dict(model="tiny", messages=CHAT, max_tokens=3, seed=5)
        plain = client.chat.completions.create(**kw)
        given = client.chat.completions.create(**kw, parallel_tool_calls=False, store=False, metadata={"team": "a"},
                                               service_tier="auto", modalities=["text"], user="u1")
        assert given.choices[0].message.content == plain.choices[0].message.content
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
        assert "store" in _assert_error(_post(url, "/v1/chat/completions", {**body, "store": True}), 400, "store")
        message = _assert_error(_post(url, "/v1/chat/completions", {**body, "modalities": ["text", "audio"]}), 400,
                                "modalities")
        assert "['text', 'audio']" in message
        _assert_error(_post(url, "/v1/chat/completions", {**body, "metadata": {"team": 1}}), 400, "metadata.team")
        _assert_error(_post(url, "/v1/chat/completions", {**body, "service_tier": "fast"}), 400, "service_tier")
        _assert_error(_post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "store": False}), 400, "store")


def test_the_successors_of_user_and_include_obfuscation_are_taken_like_user(tiny_server, live_server):
    """Regression: ``user`` was taken, but ``safety_identifier`` and ``prompt_cache_key`` (which OpenAI's API has in its
    place) and ``stream_options.include_obfuscation`` (which the ``openai`` client types) were a 400."""
    with live_server(tiny_server) as url:
        client = openai_client(url)
        answer = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, safety_identifier="h1",
                                                prompt_cache_key="k1", extra_body={"min_tokens": 2})  # no early EOS
        assert answer.choices[0].finish_reason == "length"
        for create, kw in ((client.chat.completions.create, dict(messages=CHAT)), (client.completions.create,
                                                                                     dict(prompt="hi"))):
            chunks = list(create(model="tiny", max_tokens=2, stream=True, **kw, extra_body={"min_tokens": 2},
                                 stream_options={"include_usage": True, "include_obfuscation": False}))
            assert chunks[-1].usage.completion_tokens == 2


REFUSED_VALUES = [  # (fields, param, what the message must quote of the value given)
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs: 2 with logprobs: false"),
    ({"response_format": {"type": "json_object"}}, "response_format", "{'type': 'json_object'}"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias", "{'5': 1.0}"),
    ({"tool_choice": "none"}, "tool_choice", "'none'"),
    ({"stop": ["x", ""]}, "stop", "['x', '']"),
]


@pytest.mark.parametrize("fields,param,given", REFUSED_VALUES, ids=[c[1] for c in REFUSED_VALUES])
def test_a_refused_value_is_named_in_the_error(tiny_server, live_server, fields, param, given):
    """Regression: these 400s named the field and what is accepted but not the value given
    ("top_logprobs needs logprobs: true", "only response_format {'type': 'text'} is supported")."""
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 2, **fields}
        assert given in _assert_error(_post(url, "/v1/chat/completions", body), 400, param)
