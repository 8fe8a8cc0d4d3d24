"""Request bounds and response fields as OpenAI's API has them, at their edges (tiny random Llama, CPU).

Each test here pins a value a hand-made mutation of the server changed without any other serving test noticing:
a bound moved by one, a field of the response left out or written wrong."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from llmspeed import lora
from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer
from tests.generation.test_engine import ChatTokenizer
from tests.serving.conftest import fail_third_sampling_call, openai_client

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "hi"}]


def _post(url, path, body):
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def _error(r, status, param):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return error["message"]


def _data(url, path, body):
    """The ``data:`` payloads of a raw streamed response, ``[DONE]`` included."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


BOUNDS = [  # (path, field, the last value taken, the first refused, other fields it needs)
    ("/v1/chat/completions", "temperature", 2, 2.5, {}),
    ("/v1/chat/completions", "n", 16, 17, {}),
    ("/v1/chat/completions", "top_logprobs", 20, 21, {"logprobs": True}),
    ("/v1/completions", "logprobs", 20, 21, {}),
    ("/v1/completions", "max_tokens", 1, 0, {}),
    ("/v1/completions", "max_tokens", 0, -1, {"echo": True}),  # 0 scores the prompt (echo)
    ("/v1/chat/completions", "max_completion_tokens", 1, 0, {}),
]


@pytest.mark.parametrize("path,field,taken,refused,extra", BOUNDS, ids=[f"{b[1]}={b[3]}" for b in BOUNDS])
def test_a_bound_takes_its_last_value_and_refuses_the_next_naming_the_field(tiny_server, live_server, path, field,
                                                                            taken, refused, extra):
    base = {"model": "tiny", "max_tokens": 1, **extra, **({"messages": CHAT} if "chat" in path else {"prompt": "hi"})}
    with live_server(tiny_server) as url:
        ok = _post(url, path, {**base, field: taken})
        assert ok.status_code == 200, ok.text
        assert f"(got {refused!r})" in _error(_post(url, path, {**base, field: refused}), 400, field)


def test_two_prompts_in_one_request_get_an_answer_each_not_the_first_alone(tiny_server, live_server):
    """Regression: a list of prompts was answered for its first prompt only; then it was refused. Each prompt now
    gets its choices (as OpenAI's API and vLLM answer), in order, with every prompt's tokens counted."""
    with live_server(tiny_server) as url:
        for prompt in (["a", "b"], [[5], [6]]):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
            both = _post(url, "/v1/completions", body).json()
            alone = [_post(url, "/v1/completions", {**body, "prompt": p}).json()["choices"][0]["text"] for p in prompt]
            assert [c["text"] for c in both["choices"]] == alone and [c["index"] for c in both["choices"]] == [0, 1]
            assert both["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
        one = _post(url, "/v1/completions", {"model": "tiny", "prompt": [[5, 6]], "max_tokens": 2})
        assert one.status_code == 200 and one.json()["usage"]["prompt_tokens"] == 2


def test_max_tokens_that_exactly_fills_the_context_is_taken(tiny_server, live_server):
    limit = tiny_server.engine.generator.scheduler.max_tokens_per_seq
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "prompt": [5, 6]}
        full = _post(url, "/v1/completions", {**body, "max_tokens": limit - 2, "min_tokens": limit - 2})
        assert full.status_code == 200, full.text
        assert full.json()["usage"]["completion_tokens"] == limit - 2
        r = _post(url, "/v1/completions", {**body, "max_tokens": limit - 1})
        assert f"at most {limit - 2} can be generated" in _error(r, 400, "max_tokens")


def test_without_max_tokens_completions_write_16_and_chat_the_rest_of_the_context(tiny_server, live_server):
    # docs/serving.md's defaults: 16 for completions (OpenAI's), the rest of the context for chat (vLLM's); min_tokens
    # at that default keeps the tiny model from ending earlier at an end-of-sequence token
    limit = tiny_server.engine.generator.scheduler.max_tokens_per_seq
    with live_server(tiny_server) as url:
        done = _post(url, "/v1/completions", {"model": "tiny", "prompt": [5, 6], "min_tokens": 16}).json()
        assert done["usage"]["completion_tokens"] == 16 and done["choices"][0]["finish_reason"] == "length"
        prompt = _post(url, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 1}).json()
        rest = limit - prompt["usage"]["prompt_tokens"]
        chat = _post(url, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "min_tokens": rest}).json()
        assert chat["usage"]["completion_tokens"] == rest and chat["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_the_response_id_object_created_model_and_usage_are_openais(tiny_server, live_server, endpoint):
    chat = endpoint == "chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "tiny", "max_tokens": 3, "min_tokens": 3, **({"messages": CHAT} if chat else {"prompt": "hi"})}
    prefix, kind = ("chatcmpl-", "chat.completion") if chat else ("cmpl-", "text_completion")
    with live_server(tiny_server) as url:
        start = int(time.time())
        whole = _post(url, path, body).json()
        data = _data(url, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
        end = int(time.time())
    chunks = [json.loads(d) for d in data[:-1]]
    assert whole["id"].startswith(prefix) and whole["object"] == kind and whole["model"] == "tiny"
    assert start <= whole["created"] <= end
    used = whole["usage"]
    assert used["completion_tokens"] == 3 and used["total_tokens"] == used["prompt_tokens"] + 3
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith(prefix) and chunks[0]["id"] != whole["id"]
    for c in chunks:
        assert c["object"] == (f"{kind}.chunk" if chat else kind) and c["model"] == "tiny"
        assert start <= c["created"] <= end
    assert chunks[-1]["usage"] == used


def test_chat_logprobs_true_alone_gives_each_tokens_logprob_and_as_many_alternatives_as_asked(tiny_server, live_server):
    with live_server(tiny_server) as url:
        client = openai_client(url)
        for top in (None, 3):
            lp = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=top,
                                                extra_body={"min_tokens": 3}).choices[0].logprobs
            assert lp is not None and len(lp.content) == 3
            assert all(len(t.top_logprobs) == (top or 0) for t in lp.content)


def test_an_adapters_parent_is_the_base_and_an_unknown_model_names_the_field(llama, live_server):
    llama.tokenizer = ChatTokenizer()
    lora.add_adapter(llama, "docs", r=2)
    with live_server(OpenAIServer(Engine(llama, kv_cache_tokens=1024), "tiny", adapters=("docs",))) as url:
        listed = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(m["id"], m["root"], m["parent"]) for m in listed] == [("tiny", "tiny", None), ("docs", "docs", "tiny")]
        assert [m["max_model_len"] for m in listed] == [512, 512]  # vLLM's field: the tiny model's positions
        from llmspeed import __version__

        assert httpx.get(f"{url}/version").json() == {"version": __version__}  # vLLM's route
        body = {"model": "nope", "prompt": "hi", "max_tokens": 2}
        assert "'nope' does not exist" in _error(_post(url, "/v1/completions", body), 404, "model")


def test_a_failure_after_tokens_that_is_no_step_fault_is_still_a_500(tiny_server, live_server, monkeypatch):
    """A request that fails after its tokens (here its tokenizer cannot decode its output) is the server's fault:
    only a request refused before any token is the client's 400."""
    from llmspeed.generation.detokenizer import Detokenizer

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected decode fault")

    with live_server(tiny_server) as url:
        monkeypatch.setattr(Detokenizer, "finish", broken)
        r = _post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "min_tokens": 2})
        assert "injected decode fault" in _error(r, 500, None) and r.json()["error"]["type"] == "server_error"


def test_a_failed_stream_with_include_usage_ends_with_the_error_and_done_no_usage(tiny_server, live_server, monkeypatch):
    with live_server(tiny_server) as url:
        fail_third_sampling_call(monkeypatch)
        body = {"model": "tiny", "prompt": "hi", "n": 2, "max_tokens": 10, "min_tokens": 10, "stream": True,
                "stream_options": {"include_usage": True}}
        data = _data(url, "/v1/completions", body)
    assert data[-1] == "[DONE]" and "injected sampler fault" in json.loads(data[-2])["error"]["message"]
    assert all(json.loads(d)["usage"] is None for d in data[:-2])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_unknown_model_is_a_404_before_the_context_is_checked(tiny_server, live_server, path):
    """Regression: the model was looked up after the prompt was rendered and fitted to the context, so an unknown
    model with a ``max_tokens`` past the context got a 400 about ``max_tokens`` instead of vLLM's 404."""
    body = {"model": "no-such-model", "max_tokens": 10**6, **({"messages": CHAT} if "chat" in path else {"prompt": "hi"})}
    with live_server(tiny_server) as url:
        r = _post(url, path, body)
        assert "no-such-model" in _error(r, 404, "model")
        assert r.json()["error"]["code"] == "model_not_found"
        assert "max_tokens" in _error(_post(url, path, {**body, "model": "tiny"}), 400, "max_tokens")


def test_text_offsets_advance_by_each_tokens_text_as_decoded():
    """The tiny server's tokens are one character each, so offsets advanced by one per token went unnoticed: with
    pieces of several characters each ``text_offset`` is where its token's text starts (the first at ``offset``)."""
    from llmspeed.generation.sampling import TokenLogprobs
    from llmspeed.serving.openai_responses import completion_logprobs

    class Pieces:
        def decode(self, ids):
            return {1: "Hello", 2: ",", 3: " world", 4: "!"}[ids[0]]

    items = [TokenLogprobs(t, -0.5 * t, [(t, -0.5 * t), (4, -3.0)]) for t in (1, 2, 3)]
    out = completion_logprobs(Pieces(), items, offset=7)
    assert out["tokens"] == ["Hello", ",", " world"]
    assert out["text_offset"] == [7, 12, 13]
    assert out["top_logprobs"][2] == {" world": -1.5, "!": -3.0}


def test_an_error_quotes_a_bounded_value_and_a_missing_field_not_the_whole_body(tiny_server, live_server):
    """Regression: a missing field's error quoted its input, which is the whole request body (a long prompt and
    all), and a wrong value was quoted however long it was."""
    long_prompt = "word " * 5000
    with live_server(tiny_server) as url:
        missing = _error(_post(url, "/v1/completions", {"prompt": long_prompt, "max_tokens": 1}), 400, "model")
        assert missing == "model: Field required"
        wrong = _error(_post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "many" * 100}),
                       400, "max_tokens")
        assert len(wrong) < 400 and "... (402 characters)" in wrong


def test_ignore_eos_and_stop_token_ids_as_vllm_takes_them(tiny_server, live_server):
    """vLLM's extensions: ``ignore_eos`` (``vllm bench serve`` sends it for fixed-length answers) and
    ``stop_token_ids``; through the Responses API too. The tiny model's eos is id 0, made certain by ``logit_bias``."""
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 5, "logit_bias": {"0": 100}}
    with live_server(tiny_server) as url:
        ends = _post(url, "/v1/completions", body).json()
        assert ends["choices"][0]["finish_reason"] == "stop" and ends["usage"]["completion_tokens"] == 1
        runs = _post(url, "/v1/completions", {**body, "ignore_eos": True}).json()
        assert runs["choices"][0]["finish_reason"] == "length" and runs["usage"]["completion_tokens"] == 5
        a = {**body, "logit_bias": {"65": 100}}  # "A" every time
        assert _post(url, "/v1/completions", a).json()["choices"][0]["text"] == "AAAAA"
        stopped = _post(url, "/v1/completions", {**a, "stop_token_ids": [65]}).json()
        # it ends the answer and is counted, its text left out as an eos token's (vLLM leaves special tokens out)
        assert (stopped["choices"][0]["text"], stopped["choices"][0]["finish_reason"]) == ("", "stop")
        assert stopped["usage"]["completion_tokens"] == 1
        answer = _post(url, "/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 5,
                                              "stop_token_ids": [0], "ignore_eos": True}).json()  # fmt: skip
        assert answer["status"] == "incomplete" and answer["usage"]["output_tokens"] == 5
        assert "got 999" in _error(_post(url, "/v1/completions", {**body, "stop_token_ids": [999]}), 400, "stop_token_ids")


def test_stop_reason_include_stop_str_allowed_token_ids_and_bad_words_as_vllm_takes_them(tiny_server, live_server):
    """vLLM's ``stop_reason`` in each choice (the stop string or token id, ``null`` for eos and length), and its
    ``include_stop_str_in_output``, ``allowed_token_ids`` and ``bad_words``, whole, streamed and through the client."""
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 6, "temperature": 0}
    with live_server(tiny_server) as url:
        plain = _post(url, "/v1/completions", body).json()["choices"][0]
        assert plain["finish_reason"] == "length" and plain["stop_reason"] is None
        stop = plain["text"][2:4]
        cut = _post(url, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
        kept = _post(url, "/v1/completions", {**body, "stop": [stop], "include_stop_str_in_output": True}).json()
        at = plain["text"].find(stop)
        assert (cut["text"], cut["stop_reason"]) == (plain["text"][:at], stop)
        assert kept["choices"][0]["text"] == plain["text"][: at + len(stop)]
        streamed = [json.loads(d) for d in _data(url, "/v1/completions", {**body, "stop": [stop], "stream": True,
                                                                         "include_stop_str_in_output": True})[:-1]]  # fmt: skip
        assert "".join(c["choices"][0]["text"] for c in streamed) == kept["choices"][0]["text"]
        assert streamed[-1]["choices"][0]["stop_reason"] == stop
        a = {**body, "logit_bias": {"65": 100}}  # "A" every time
        by_token = _post(url, "/v1/completions", {**a, "stop_token_ids": [65], "include_stop_str_in_output": True})
        assert (by_token.json()["choices"][0]["text"], by_token.json()["choices"][0]["stop_reason"]) == ("A", 65)
        chat = openai_client(url).chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=6, temperature=0,
            extra_body={"allowed_token_ids": [66, 67], "bad_words": ["B"]})  # fmt: skip
        assert chat.choices[0].message.content == "CCCCCC" and chat.choices[0].model_extra["stop_reason"] is None
        assert "got 256" in _error(_post(url, "/v1/completions", {**body, "allowed_token_ids": [1, 256]}), 400,
                                   "allowed_token_ids")  # fmt: skip
        assert "`bad_words`" in _error(_post(url, "/v1/completions", {**body, "bad_words": [" "]}), 400, "bad_words")


def test_priority_needs_the_priority_policy_and_then_orders_the_waiting_requests(llama, live_server, monkeypatch):
    """vLLM's ``priority`` field: a 400 naming it on a first-come-first-served server (``Engine.submit`` raises, and
    nothing is queued); with ``--scheduling-policy priority`` and one request running at a time, of two requests
    waiting behind a long one the lower value runs first, whichever came first."""
    from llmspeed.generation import engine as engine_module

    llama.tokenizer = ChatTokenizer()
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with live_server(OpenAIServer(Engine(llama, kv_cache_tokens=4096), "tiny")) as url:
        assert "scheduling-policy priority" in _error(_post(url, "/v1/completions", {**body, "priority": 1}), 400,
                                                      "priority")  # fmt: skip
        assert _post(url, "/v1/completions", {**body, "priority": 0}).status_code == 200
    real = engine_module.sample_batch
    monkeypatch.setattr(engine_module, "sample_batch", lambda *a, **k: (time.sleep(0.01), real(*a, **k))[1])
    engine = Engine(llama, kv_cache_tokens=4096, max_seqs=1, scheduling_policy="priority")
    with pytest.raises(ValueError, match="priority must be an integer"):
        engine.submit([1, 2], priority="high")
    with live_server(OpenAIServer(engine, "tiny")) as url:
        done: list[str] = []

        def ask(name, priority, tokens):
            r = _post(url, "/v1/completions", {**body, "max_tokens": tokens, "priority": priority})
            assert r.status_code == 200, r.text
            done.append(name)

        import threading

        threads = [threading.Thread(target=ask, args=("long", 0, 80))]
        threads[0].start()
        time.sleep(0.3)  # the long one runs; the next two wait for its slot
        for name, priority in (("late", 5), ("urgent", -1)):
            threads.append(threading.Thread(target=ask, args=(name, priority, 4)))
            threads[-1].start()
            time.sleep(0.1)
        for t in threads:
            t.join(60)
        assert done == ["long", "urgent", "late"]


def test_skip_special_tokens_false_keeps_the_tokenizers_special_text(tiny_server, live_server):
    """The byte tokenizer's id 0 is special (its decode leaves it out with ``skip_special_tokens``): forced by
    ``logit_bias`` and kept past eos by ``ignore_eos``, it is in the answer only with ``skip_special_tokens: false``."""
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "logit_bias": {"0": 100}, "ignore_eos": True}
    with live_server(tiny_server) as url:
        assert _post(url, "/v1/completions", body).json()["choices"][0]["text"] == ""
        kept = _post(url, "/v1/completions", {**body, "skip_special_tokens": False}).json()["choices"][0]["text"]
        assert kept == "\x00" * 3
