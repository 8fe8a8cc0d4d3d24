"""The OpenAI API's request checks as the official ``openai`` client and raw HTTP see them, on a tiny random Llama:
a field of the wrong type or value is a 400 naming the field, the value given and what is accepted (never coerced
or cut silently), and the fields OpenAI's API has that change nothing here are taken as vLLM takes them.

Moved from ``test_openai_contract.py``, which keeps streams, faults, lifecycle, models and logprobs.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.serving.conftest import assert_error as _assert_error
from tests.serving.conftest import openai_client
from tests.serving.conftest import post_json as _post

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "hi"}]


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
        assert "min_tokens must be at most the default max_tokens=16 (none given); got 20" in _assert_error(
            r, 400, "min_tokens")
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}  # chat's default: the context left
        says = _assert_error(_post(url, "/v1/chat/completions", {**chat, "min_tokens": 10**6}), 400, "min_tokens")
        assert re.search(r"at most the default max_tokens=\d+ \(none given\); got 1000000", says), says
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
    ({"response_format": {"type": "yaml"}}, "response_format", "{'type': 'yaml'}"),
    ({"logit_bias": {"x5": 1.0}}, "logit_bias", "'x5'"),
    ({"logit_bias": {"-5": 1.0}}, "logit_bias", "'-5'"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias", "100.5 for token 5"),
    ({"logit_bias": {"5": 1.0, "99999999": -1}}, "logit_bias", "vocabulary size 256; got 99999999"),
    ({"logit_bias": {"9" * 5000: 1.0}}, "logit_bias", "vocabulary size 256; got 9999"),  # past int()'s digit limit
    ({"min_p": 1.5}, "min_p", "1.5"),
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


def test_logit_bias_and_min_p_are_taken_as_openai_and_vllm_take_them(tiny_server, live_server):
    """``logit_bias`` (OpenAI's API: token ids as strings, -100 to 100) and ``min_p`` (vLLM's extension) shape what is
    sampled: +100 on a token makes every greedy token that one, -100 on the unbiased answer's tokens keeps them out,
    and streamed choices follow the same bias. It was a 400 "not supported"."""
    with live_server(tiny_server) as url:
        client = openai_client(url)
        forced = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0,
                                           logit_bias={"65": 100}, extra_body={"min_tokens": 4})
        assert forced.choices[0].text == "AAAA"  # the byte-level tokenizer: token 65 is "A"
        plain = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0,
                                               extra_body={"min_tokens": 4})
        banned = {str(ord(c)): -100 for c in plain.choices[0].message.content}
        moved = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0,
                                               logit_bias=banned, extra_body={"min_tokens": 4})
        assert not set(moved.choices[0].message.content) & set(plain.choices[0].message.content)
        chunks = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0.8, seed=5,
                                                stream=True, logit_bias={"66": 100}, extra_body={"min_p": 0.2,
                                                                                                "min_tokens": 3})
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "BBB"
