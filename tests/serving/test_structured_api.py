"""Structured outputs over HTTP, driven by the official ``openai`` client: OpenAI's ``response_format`` (``json_schema``,
``json_object``; the client's own ``parse`` into a pydantic model), vLLM's ``structured_outputs`` and ``guided_*``
fields, streamed and with ``n`` choices; bad fields are 400s naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from pydantic import BaseModel

from tests.serving.conftest import openai_client, post_json

pytest.importorskip("xgrammar")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
CHAT = [{"role": "user", "content": "Describe a person called Ann who is 31 years old, as JSON."}]


class Person(BaseModel):
    name: str
    age: int


@pytest.mark.slow
def test_structured_outputs_through_the_openai_client(smollm2_cached, live_server):
    from llmspeed.serving import Engine
    from llmspeed.serving.server import OpenAIServer

    with live_server(OpenAIServer(Engine(smollm2_cached, kv_cache_tokens=2048), "smollm2")) as url:
        client = openai_client(url)
        schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        answer = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=48, temperature=0,
                                                response_format=schema, n=2, seed=3)  # fmt: skip
        for choice in answer.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), PERSON)

        # the client's own structured parse: it sends the pydantic model's schema and parses the answer with it
        parsed = client.chat.completions.parse(model="smollm2", messages=CHAT, max_tokens=48, temperature=0.7, seed=1,
                                               response_format=Person).choices[0].message.parsed  # fmt: skip
        assert isinstance(parsed, Person)

        chunks = list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=64, temperature=0,
                                                     stream=True, response_format={"type": "json_object"},
                                                     extra_body={"structured_outputs": None}))  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        if chunks[-1].choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert text.lstrip().startswith("{")

        done = client.completions.create(model="smollm2", prompt="The sentiment of 'I love it' is", max_tokens=8,
                                         temperature=0, extra_body={"guided_choice": ["positive", "negative"]})
        assert done.choices[0].text in ("positive", "negative") and done.choices[0].finish_reason == "stop"
        phone = client.completions.create(model="smollm2", prompt="Call me at", max_tokens=12, temperature=0,
                                          extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}})
        assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", phone.choices[0].text)
        compact = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=48, temperature=0,
                                                 extra_body={"guided_json": PERSON})  # fmt: skip
        jsonschema.validate(json.loads(compact.choices[0].message.content), PERSON)


REFUSED = [  # (fields, param, what the message must say)
    ({"response_format": {"type": "yaml"}}, "response_format", "{'type': 'yaml'}"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "must have a 'schema'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "response_format", "cannot be compiled"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "response_format",
     "give one way of structuring the output"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "structured_outputs.regex cannot be compiled"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "['structural_tag']"),
    ({"structured_outputs": {"choice": ["a"], "disable_any_whitespace": 1}}, "structured_outputs.disable_any_whitespace",
     "must be a boolean"),
    ({"guided_choice": []}, "guided_choice", "must be a non-empty list"),
    ({"guided_json": "{not json"}, "guided_json", "must be a JSON schema"),
    ({"guided_regex": 5}, "guided_regex", "Input should be a valid string"),
]  # fmt: skip


@pytest.mark.parametrize("fields,param,said", REFUSED, ids=[f"{c[1]}-{i}" for i, c in enumerate(REFUSED)])
def test_a_bad_structured_output_field_is_a_400_naming_it(tiny_server, live_server, fields, param, said):
    with live_server(tiny_server) as url:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})):
            reply = post_json(url, path, {"model": "tiny", "max_tokens": 2, **body, **fields})
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["param"] == param and said in error["message"], error


def test_response_format_text_is_free_text(tiny_server, live_server):
    """``{"type": "text"}`` (what the ``openai`` client's users send for "no format") asks for nothing."""
    with live_server(tiny_server) as url:
        answer = openai_client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                            max_tokens=2, response_format={"type": "text"})
        assert answer.choices[0].finish_reason in ("stop", "length")


def test_a_tokenizer_xgrammar_cannot_read_is_a_400_saying_so(tiny_server, live_server):
    """The tiny server's byte-level tokenizer is not a Hugging Face one: the request is refused before any token,
    saying why, and the server goes on answering free-text requests."""
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        reply = post_json(url, "/v1/chat/completions", {**body, "guided_choice": ["a", "b"]})
        assert reply.status_code == 400
        assert "structured outputs need a Hugging Face tokenizer xgrammar can read" in reply.json()["error"]["message"]
        assert post_json(url, "/v1/chat/completions", body).status_code == 200
