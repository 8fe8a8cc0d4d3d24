"""``POST /v1/responses`` (OpenAI's Responses API) through the official ``openai`` client: the same answer as the chat
request it asks for, whole or streamed (the client's ``responses.stream`` checks every event's order and identity),
its input items read as chat messages, log-probabilities, tool calls, structured text, failures and refusals."""

from __future__ import annotations

import json

import httpx
import pytest

from llmspeed.serving.responses_request import ResponsesRequest
from tests.serving.conftest import assert_error, fail_third_sampling_call, openai_client, post_json

SYSTEM, ASK = "Be brief.", "Tell me about the sea."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}]


def _events(url: str, body: dict) -> list[dict]:
    """The server-sent events of a streamed request, each checked to name its type in its ``event:`` line."""
    with httpx.stream("POST", f"{url}/v1/responses", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    named = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert named == [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_the_answer_is_the_chat_answer_whole_and_streamed(tiny_server, live_server):
    with live_server(tiny_server) as url:
        client = openai_client(url)
        long = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=40, temperature=0)
        stop = long.choices[0].message.content[8:10]  # the random model never meets its eos: a stop string ends it
        for limit, extra in ((6, {}), (40, {"stop": stop})):  # cut by max_output_tokens, and ended by the stop string
            chat = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=limit,
                                                  temperature=0, **extra)  # fmt: skip
            answer = client.responses.create(model="tiny", input=ASK, instructions=SYSTEM, max_output_tokens=limit,
                                             temperature=0, extra_body=extra)  # fmt: skip
            assert answer.output_text == chat.choices[0].message.content and answer.object == "response"
            assert (answer.usage.input_tokens, answer.usage.output_tokens, answer.usage.total_tokens) == (
                chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens)
            cut = chat.choices[0].finish_reason == "length"
            assert cut == (limit == 6) and answer.status == ("incomplete" if cut else "completed")
            assert (answer.incomplete_details.reason if cut else answer.incomplete_details) == (
                "max_output_tokens" if cut else None)
            assert (answer.instructions, answer.max_output_tokens, answer.temperature) == (SYSTEM, limit, 0)
            (message,) = answer.output
            assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
            assert message.status == answer.status

            events = _events(url, {"model": "tiny", "input": ASK, "instructions": SYSTEM, "max_output_tokens": limit,
                                   "temperature": 0, **extra})  # fmt: skip
            kinds = [e["type"] for e in events]
            assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                                 "response.content_part.added"]  # fmt: skip
            assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                                  "response.incomplete" if cut else "response.completed"]  # fmt: skip
            deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
            assert "".join(deltas) == answer.output_text and all(deltas)
            final = events[-1]["response"]
            assert final["status"] == answer.status and final["usage"]["output_tokens"] == answer.usage.output_tokens
            assert final["output"][0]["content"][0]["text"] == answer.output_text
            assert len({e["response"]["id"] for e in events if "response" in e}) == 1

        with client.responses.stream(model="tiny", input=ASK, instructions=SYSTEM, max_output_tokens=40,
                                     temperature=0, extra_body={"stop": stop}) as stream:  # fmt: skip
            seen = [e.type for e in stream]
            assert stream.get_final_response().output_text == answer.output_text
        assert seen[-1] == "response.completed"


def _shape(logprobs: list[dict]) -> list:
    return [(lp["token"], lp["bytes"], [(t["token"], t["bytes"]) for t in lp["top_logprobs"]]) for lp in logprobs]


def _values(logprobs: list[dict]) -> list[float]:
    return [v for lp in logprobs for v in (lp["logprob"], *(t["logprob"] for t in lp["top_logprobs"]))]


def test_logprobs_are_the_chat_answers(tiny_server, live_server):
    with live_server(tiny_server) as url:
        client = openai_client(url)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": ASK}], temperature=0,
                                              max_completion_tokens=8, logprobs=True, top_logprobs=3)  # fmt: skip
        answer = client.responses.create(model="tiny", input=ASK, temperature=0, max_output_tokens=8, top_logprobs=3,
                                         include=["message.output_text.logprobs"])  # fmt: skip
        got = [lp.model_dump() for lp in answer.output[0].content[0].logprobs]
        want = [lp.model_dump() for lp in chat.choices[0].logprobs.content]
        # the same tokens, bytes and alternatives; the values to float rounding (the second request's prompt is
        # read from the prefix cache)
        assert _shape(got) == _shape(want) and len(got) == 8 and all(len(lp["top_logprobs"]) == 3 for lp in got)
        assert _values(got) == pytest.approx(_values(want), abs=1e-4)
        events = _events(url, {"model": "tiny", "input": ASK, "temperature": 0, "max_output_tokens": 8, "top_logprobs": 3,
                               "include": ["message.output_text.logprobs"]})  # fmt: skip
        streamed = [lp for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
        assert streamed == got == events[-1]["response"]["output"][0]["content"][0]["logprobs"]
        plain = client.responses.create(model="tiny", input=ASK, temperature=0, max_output_tokens=8)
        assert plain.output[0].content[0].logprobs == []


def test_input_items_are_read_as_the_chat_messages_they_are():
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    request = ResponsesRequest.model_validate({
        "model": "m", "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather"}, {"type": "input_text", "text": "?"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
            call,
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "developer", "content": "Now in French."},
        ],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
        "max_output_tokens": 9, "seed": 3, "stream": True,
    })  # fmt: skip
    chat, origins = request.chat_payload()
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}], "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "hm"},
        {"role": "developer", "content": "Now in French."},
    ]  # fmt: skip
    assert origins == ["instructions", "input.0", "input.1", "input.3", "input.5", "input.6"]
    assert chat["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                             "strict": True}}  # fmt: skip
    assert (chat["max_completion_tokens"], chat["seed"], chat["parallel_tool_calls"]) == (9, 3, False)
    assert chat["stream_options"] == {"include_usage": True}
    lone, _ = ResponsesRequest.model_validate({"model": "m", "input": [call]}).chat_payload()
    assert lone["messages"] == [{"role": "assistant", "content": None, "tool_calls": chat["messages"][2]["tool_calls"]}]


@pytest.mark.parametrize(("fields", "param", "said"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"store": True}, "store", "store: false"),
    ({"background": True}, "background", "background: false"),
    ({"truncation": "auto"}, "truncation", "'disabled'"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "leave reasoning out"),
    ({"include": ["reasoning.encrypted_content"]}, "include.0", "message.output_text.logprobs"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options", "stream: true"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0.type",
     "text only"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "function_call_output"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role", "'developer'"),
    ({"input": []}, "input", "empty"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "function tools only"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "web_search"}}, "tool_choice", "named"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "json_schema"),
    ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"temperature": "0.5"}, "temperature", "valid number"),
    ({"n": 2}, "n", "Extra inputs"),
    # found once read as a chat request: named as the Responses field
    ({"max_output_tokens": 10**6}, "max_output_tokens", "max_output_tokens=1000000 is too large"),
    ({"instructions": "x", "input": [{"role": "user", "content": "a"}, {"role": "user"}]}, "input.1.content",
     "input.1.content is required"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice",
     "not in tools"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "must have a 'schema'"),
])  # fmt: skip
def test_what_the_server_cannot_answer_is_a_400_naming_the_field(tiny_server, live_server, fields, param, said):
    with live_server(tiny_server) as url:
        r = post_json(url, "/v1/responses", {"model": "tiny", "input": "hi", **fields})
        message = assert_error(r, 400, param)
        assert said in message, message
        assert "max_completion_tokens" not in message and "messages." not in message and "response_format" not in message
        assert_error(post_json(url, "/v1/responses", {"model": "nope", "input": "hi"}), 404, "model")


def test_a_failure_after_the_stream_began_ends_it_with_error_and_failed(tiny_server, live_server, monkeypatch):
    fail_third_sampling_call(monkeypatch)
    with live_server(tiny_server) as url:
        events = _events(url, {"model": "tiny", "input": ASK, "max_output_tokens": 20, "temperature": 0})
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds
    assert "injected sampler fault" in events[-2]["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "injected sampler fault" in failed["error"]["message"]


@pytest.mark.slow
def test_tool_calls_and_structured_text_on_smollm2(smollm2, live_server):
    """A named function tool comes back as a ``function_call`` item (its arguments streamed as deltas), and
    ``text.format`` a JSON schema that ``responses.parse`` reads into a pydantic model."""
    pytest.importorskip("xgrammar")
    import jsonschema
    from pydantic import BaseModel

    from llmspeed.serving import Engine
    from llmspeed.serving.server import OpenAIServer
    from tests.serving.test_tool_choice import ASK as WEATHER_ASK
    from tests.serving.test_tool_choice import TEMPLATE, WEATHER

    class City(BaseModel):
        name: str
        country: str

    smollm2.tokenizer.chat_template = TEMPLATE
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}
    with live_server(OpenAIServer(Engine(smollm2, kv_cache_tokens=2048), "smollm2")) as url:
        client = openai_client(url)
        named = {"type": "function", "name": "get_weather"}
        answer = client.responses.create(model="smollm2", input=WEATHER_ASK, tools=[tool], tool_choice=named,
                                         temperature=0, max_output_tokens=40)  # fmt: skip
        (call,) = answer.output
        assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call-")
        jsonschema.validate(json.loads(call.arguments), WEATHER)
        with client.responses.stream(model="smollm2", input=WEATHER_ASK, tools=[tool], tool_choice=named,
                                     temperature=0, max_output_tokens=40) as stream:  # fmt: skip
            pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
            (streamed,) = stream.get_final_response().output
        assert "".join(pieces) == streamed.arguments == call.arguments and len(pieces) > 1

        parsed = client.responses.parse(model="smollm2", input="Name a city in Italy, as JSON.", text_format=City,
                                        temperature=0, max_output_tokens=60)  # fmt: skip
        assert isinstance(parsed.output_parsed, City) and parsed.status == "completed"


def test_events_of_reasoning_text_and_parsed_calls_match_the_whole_answer():
    """A chat stream with reasoning, text and two calls read out of it (``tool_choice: "auto"``) becomes the same
    items as the whole answer: reasoning, message, two function calls, each opened, grown and closed in order."""
    from llmspeed.serving.responses_output import ResponseEvents, whole

    req = ResponsesRequest.model_validate({"model": "m", "input": "hi", "stream": True})
    call = {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "think"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "ing"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Let me "}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "look."}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_a", **call},
                                                           {"index": 1, "id": "call_b", **call}]},
                      "finish_reason": "tool_calls"}]},  # fmt: skip
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}},
        "[DONE]",
    ]
    stream = ResponseEvents(req)
    events = stream.opening() + [e for c in chunks for e in stream.chunk(c, cached=2)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added = [(e["output_index"], e["item"]["type"]) for e in events if e["type"] == "response.output_item.added"]
    done = [(e["output_index"], e["item"]["type"]) for e in events if e["type"] == "response.output_item.done"]
    assert added == done == [(0, "reasoning"), (1, "message"), (2, "function_call"), (3, "function_call")]
    final = events[-1]
    assert final["type"] == "response.completed" and final["response"]["usage"]["input_tokens_details"] == {"cached_tokens": 2}
    answer = {"created": 0, "choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "reasoning_content": "thinking", "content": "Let me look.",
        "tool_calls": [{"id": "call_a", **call}, {"id": "call_b", **call}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}  # fmt: skip
    items = whole(req, answer, cached=2)["output"]

    def strip(item: dict) -> dict:
        return {k: v for k, v in item.items() if k != "id"}

    assert [strip(i) for i in final["response"]["output"]] == [strip(i) for i in items]
    assert items[2]["call_id"] == "call_a" and items[3]["arguments"] == '{"a": 1}'
    assert all(i["status"] == "completed" for i in items)
