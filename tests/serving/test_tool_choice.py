"""Forced tool calls (``tool_choice: "required"`` or a named function) through the official ``openai`` client, on
SmolLM2 with a chat template that writes the tools: the answer is constrained to calls that validate against each
tool's parameters and comes back as ``message.tool_calls``, streamed or not, as vLLM answers without a parser."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import BaseModel

from tests.serving.conftest import openai_client, post_json

pytest.importorskip("xgrammar")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
           "additionalProperties": False}  # fmt: skip
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"],
        "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
TEMPLATE = (  # ChatML with the tools written into a system turn (SmolLM2's own template drops them)
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n{%- for t in tools %}\n{{ t | tojson }}"
    "{%- endfor %}<|im_end|>\n{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Weather(BaseModel):
    city: str
    unit: str


def _streamed(chunks) -> tuple[list[dict], str | None, str]:
    """The calls a client puts together from streamed ``tool_calls`` deltas (by index), the finish reason, the text."""
    calls: dict[int, dict] = {}
    reason, text = None, ""
    for c in chunks:
        for choice in c.choices:
            text += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                call["arguments"] += d.function.arguments or ""
            reason = choice.finish_reason or reason
    return [calls[k] for k in sorted(calls)], reason, text


@pytest.mark.slow
def test_forced_tool_calls_through_the_openai_client(smollm2, live_server):
    from llmspeed.serving import Engine
    from llmspeed.serving.server import OpenAIServer

    smollm2.tokenizer.chat_template = TEMPLATE
    with live_server(OpenAIServer(Engine(smollm2, kv_cache_tokens=2048), "smollm2")) as url:
        client = openai_client(url)
        named = {"type": "function", "function": {"name": "get_weather"}}
        answer = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice=named,
                                                temperature=0, max_tokens=40)  # fmt: skip
        choice = answer.choices[0]
        assert choice.finish_reason == "stop" and choice.message.content is None  # OpenAI's reason for a forced call
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call-")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)

        calls, reason, text = _streamed(client.chat.completions.create(
            model="smollm2", messages=ASK, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=40, stream=True))
        assert reason == "stop" and text == "" and len(calls) == 1 and calls[0]["id"].startswith("call-")
        assert (calls[0]["name"], calls[0]["arguments"]) == ("get_weather", call.function.arguments)  # same greedy call

        required = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                                  temperature=0, max_tokens=80)  # fmt: skip
        assert required.choices[0].finish_reason == "tool_calls" and required.choices[0].message.content is None
        made = required.choices[0].message.tool_calls
        assert made and all(c.function.name in SCHEMAS for c in made)
        for c in made:
            jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
        calls, reason, _ = _streamed(client.chat.completions.create(
            model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80, stream=True))
        assert reason == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
            [(c.function.name, json.loads(c.function.arguments)) for c in made]  # fmt: skip

        # the client's own typed tools: it sends the pydantic model's schema and parses the call's arguments with it
        parsed = client.chat.completions.parse(
            model="smollm2", messages=ASK, tools=[__import__("openai").pydantic_function_tool(Weather)],
            tool_choice={"type": "function", "function": {"name": "Weather"}}, temperature=0, max_tokens=40)
        assert isinstance(parsed.choices[0].message.tool_calls[0].function.parsed_arguments, Weather)

        cut = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                             temperature=0, max_tokens=3)  # fmt: skip
        assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls is None
        assert cut.choices[0].message.content.startswith("[")  # not a complete array: the text, as it got

        both = post_json(url, "/v1/chat/completions", {"model": "smollm2", "messages": ASK, "tools": TOOLS,
                                                       "tool_choice": "required", "response_format": {"type": "json_object"}})
        assert both.status_code == 400 and both.json()["error"]["param"] == "tool_choice"
        assert "give one way of structuring the output" in both.json()["error"]["message"]


def test_required_schema_takes_arrays_of_calls_each_valid_for_its_own_tool():
    from llmspeed.serving.tool_choice import forced_schema

    schema = forced_schema(TOOLS, "required")
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}},
                         {"name": "get_time", "parameters": {"zone": "CET"}}], schema)  # fmt: skip
    for wrong in ([], [{"name": "get_time", "parameters": {"city": "Paris", "unit": "celsius"}}],
                  [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "kelvin"}}],
                  [{"name": "get_date", "parameters": {}}], {"name": "get_time", "parameters": {"zone": "CET"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    assert forced_schema(TOOLS, {"type": "function", "function": {"name": "get_time"}}) == TIME
    assert forced_schema(TOOLS, "none") is None
    bare = [{"type": "function", "function": {"name": "ping"}}]  # no parameters: any object
    assert forced_schema(bare, {"type": "function", "function": {"name": "ping"}}) == {"type": "object"}


def test_streamed_deltas_open_a_named_call_once_and_send_required_calls_whole():
    from llmspeed.serving.tool_choice import ToolDeltas, message

    named = ToolDeltas({"type": "function", "function": {"name": "get_time"}})
    first, _ = named.delta('{"zone', None)
    assert first["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"zone'}
    assert named.delta('": "CET"}', "stop") == ({"tool_calls": [{"index": 0, "function": {"arguments": '": "CET"}'}}]},
                                                "stop")  # fmt: skip
    required = ToolDeltas("required")
    assert required.delta('[{"name": "get_time", ', None) == ({}, None)  # held until the array is complete
    delta, reason = required.delta('"parameters": {"zone": "CET"}}]', "stop")
    assert reason == "tool_calls" and delta["tool_calls"][0]["function"] == {"name": "get_time",
                                                                            "arguments": '{"zone": "CET"}'}
    assert message("required", '[{"name": "get_ti', "length") == ({"role": "assistant", "content": '[{"name": "get_ti'},
                                                                  "length")  # fmt: skip
