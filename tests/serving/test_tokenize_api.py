"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's): the ids are those the completion endpoints run, the text
is the tokenizer's own, and bad requests are 400s naming the field."""

from __future__ import annotations

import httpx
import pytest

from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer
from tests.serving.conftest import assert_error, post_json

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "What is a decorator?"}]


def test_tokenize_gives_the_ids_the_completion_endpoints_run_and_detokenize_inverts_it(smollm2, live_server):
    """Golden: the ids are transformers' (``encode``, ``apply_chat_template``) and each completion's
    ``usage.prompt_tokens`` is their count; the token strings are ``convert_ids_to_tokens``'."""
    tok = smollm2.tokenizer
    text = "The capital of France is"
    with live_server(OpenAIServer(Engine(smollm2, kv_cache_tokens=4096), "smollm2", api_key="k")) as url:
        key = {"authorization": "Bearer k"}
        plain = httpx.post(f"{url}/tokenize", json={"model": "smollm2", "prompt": text, "return_token_strs": True},
                           headers=key).json()  # fmt: skip
        assert plain["tokens"] == tok.encode(text) and plain["count"] == len(plain["tokens"])
        assert plain["token_strs"] == tok.convert_ids_to_tokens(plain["tokens"])
        assert plain["max_model_len"] == 4096 < smollm2.hf.config.max_position_embeddings  # the engine's cache bounds it
        assert_error(post_json(url, "/tokenize", {"messages": CHAT}), 401, None)  # the API key guards it too
        assert_error(post_json(url, "/detokenize", {"tokens": [1]}), 401, None)
        chat = httpx.post(f"{url}/tokenize", json={"messages": CHAT}, headers={"authorization": "Bearer k"}).json()
        assert chat["tokens"] == list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"])
        assert chat["token_strs"] is None
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=120)
        assert client.completions.create(model="smollm2", prompt=text, max_tokens=1).usage.prompt_tokens == plain["count"]
        answer = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1)
        assert answer.usage.prompt_tokens == chat["count"]
        back = httpx.post(f"{url}/detokenize", json={"model": "smollm2", "tokens": plain["tokens"]}, headers=key).json()
        assert back == {"prompt": tok.decode(plain["tokens"])} and back["prompt"] == text
        ids = httpx.post(f"{url}/tokenize", json={"prompt": plain["tokens"]}, headers=key).json()
        assert ids["tokens"] == plain["tokens"]


@pytest.mark.parametrize("path,body,status,param,quoted", [
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, 400, "prompt", "not both"),
    ("/tokenize", {}, 400, "messages", "not neither"),
    ("/tokenize", {"prompt": ""}, 400, "prompt", "empty"),
    ("/tokenize", {"prompt": [1, 999]}, 400, "prompt", "999"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "5"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "robot"),
    ("/tokenize", {"prompt": "hi", "tools": []}, 400, "tools", "tools go with messages"),
    ("/tokenize", {"prompt": "hi", "add_special": True}, 400, "add_special", "add_special"),
    ("/tokenize", {"model": "other", "prompt": "hi"}, 404, "model", "'other'"),
    ("/detokenize", {"tokens": [65, 256]}, 400, "tokens", "256"),
    ("/detokenize", {"tokens": "AB"}, 400, "tokens", "'AB'"),
    ("/detokenize", {}, 400, "tokens", "required"),
    ("/detokenize", {"model": "other", "tokens": [65]}, 404, "model", "'other'"),
    ("/detokenize", [65], 400, None, "JSON object"),
], ids=lambda v: None)  # fmt: skip
def test_a_bad_tokenize_or_detokenize_request_is_an_error_naming_the_field(tiny_server, live_server, path, body,
                                                                          status, param, quoted):  # fmt: skip
    with live_server(tiny_server) as url:
        message = assert_error(post_json(url, path, body), status, param)
        assert quoted in message


def test_tokenize_follows_the_byte_tokenizer_and_its_chat_template(tiny_server, live_server):
    with live_server(tiny_server) as url:
        assert post_json(url, "/tokenize", {"prompt": "AB"}).json()["tokens"] == [65, 66]
        out = post_json(url, "/tokenize", {"model": "tiny", "messages": [{"role": "user", "content": "hey"}],
                                           "return_token_strs": True}).json()  # fmt: skip
        assert out["tokens"] == [104, 101, 121] and out["token_strs"] == ["h", "e", "y"]  # no convert_ids_to_tokens
        assert post_json(url, "/detokenize", {"tokens": [104, 105]}).json() == {"prompt": "hi"}
