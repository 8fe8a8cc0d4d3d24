"""Stored responses (``--enable-responses-store``): ``previous_response_id`` runs the stored conversation before the
new input (the same answer as that conversation sent in full), ``responses.retrieve`` and ``responses.delete`` through
the ``openai`` client, streamed answers stored too, ``store: false`` kept out, the oldest forgotten first."""

from __future__ import annotations

import pytest

from llmspeed.serving import Engine
from llmspeed.serving.responses_store import ResponseStore
from llmspeed.serving.server import OpenAIServer
from tests.generation.test_engine import ChatTokenizer
from tests.serving.conftest import assert_error, openai_client, post_json

openai = pytest.importorskip("openai")

ASK = dict(model="tiny", max_output_tokens=6, temperature=0)


@pytest.fixture
def stored_server(llama):
    llama.tokenizer = ChatTokenizer()
    return OpenAIServer(Engine(llama, kv_cache_tokens=4096), "tiny", responses_store=True)


def test_previous_response_id_runs_the_stored_conversation_first(stored_server, live_server):
    with live_server(stored_server) as url:
        client = openai_client(url)
        first = client.responses.create(input="My name is Ann.", **ASK)
        assert first.store is True and client.responses.retrieve(first.id).model_dump() == first.model_dump()
        second = client.responses.create(input="What is my name?", previous_response_id=first.id, **ASK)
        assert second.previous_response_id == first.id
        in_full = client.responses.create(input=[{"role": "user", "content": "My name is Ann."},
                                                 {"role": "assistant", "content": first.output_text},
                                                 {"role": "user", "content": "What is my name?"}], **ASK)  # fmt: skip
        assert second.output_text == in_full.output_text and second.usage.input_tokens == in_full.usage.input_tokens
        third = client.responses.create(input="And again?", previous_response_id=second.id, **ASK)
        assert third.usage.input_tokens > second.usage.input_tokens  # the whole chain, not the last turn alone
        with client.responses.stream(input="Streamed.", previous_response_id=first.id, **ASK) as stream:
            final = [e.response for e in stream if e.type in ("response.completed", "response.incomplete")][-1]
        assert final.status == "incomplete"  # cut by max_output_tokens, which is stored too
        assert client.responses.retrieve(final.id).model_dump() == final.model_dump()


def test_store_false_delete_and_unknown_ids(stored_server, live_server):
    with live_server(stored_server) as url:
        client = openai_client(url)
        unkept = client.responses.create(input="Hello.", store=False, **ASK)
        assert unkept.store is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(unkept.id)
        kept = client.responses.create(input="Hello.", **ASK)
        client.responses.delete(kept.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(kept.id)
        assert_error(post_json(url, "/v1/responses", {**ASK, "input": "x", "previous_response_id": kept.id}), 404,
                     "previous_response_id")  # fmt: skip
        assert len(stored_server.responses_store) == 0


def test_a_server_without_a_store_refuses_what_needs_one(tiny_server, live_server):
    with live_server(tiny_server) as url:
        body = {**ASK, "input": "x"}
        assert "--enable-responses-store" in assert_error(post_json(url, "/v1/responses",
                                                                    {**body, "previous_response_id": "resp_1"}),
                                                          400, "previous_response_id")  # fmt: skip
        assert_error(post_json(url, "/v1/responses", {**body, "store": True}), 400, "store")
        answer = post_json(url, "/v1/responses", body).json()
        assert answer["store"] is False
        import httpx

        assert httpx.get(f"{url}/v1/responses/{answer['id']}", timeout=30).status_code == 404


def test_the_least_recently_used_response_is_forgotten_first():
    store = ResponseStore(capacity=2)
    for rid in ("a", "b"):
        store.put({"id": rid, "output": []}, [])
    store.get("a")  # used: "b" is now the oldest
    store.put({"id": "c", "output": []}, [])
    assert store.get("a")["id"] == "a" and store.get("c")["id"] == "c" and len(store) == 2
    with pytest.raises(Exception, match="'b' is not stored"):
        store.get("b")
