"""``tool_choice: "auto"`` (the default with ``tools``) through the official ``openai`` client: the server reads the
calls out of the answer with its ``tool_call_parser``, streamed or whole, and answers a 400 without one. SmolLM2 writes
a Hermes call here because the regex of ``structured_outputs`` holds it to one; the parsing is what is tested."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.serving.conftest import openai_client, post_json
from tests.serving.test_tool_choice import ASK, TEMPLATE, TOOLS, WEATHER, _streamed

pytest.importorskip("xgrammar")

ONE_CALL = (r'Let me check\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris", '
            r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')  # fmt: skip
TWO_CALLS = ONE_CALL + r'\n<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "CET"\}\}\n</tool_call>'


@pytest.mark.slow
def test_auto_tool_calls_are_read_out_of_the_answer(smollm2, live_server):
    from llmspeed.serving import Engine
    from llmspeed.serving.server import OpenAIServer

    smollm2.tokenizer.chat_template = TEMPLATE
    server = OpenAIServer(Engine(smollm2, kv_cache_tokens=2048), "smollm2", tool_call_parser="hermes")
    with live_server(server) as url:
        client = openai_client(url)

        def ask(regex: str | None = None, max_tokens: int = 60, **fields):
            extra = {"structured_outputs": {"regex": regex}} if regex else None
            return client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, temperature=0,
                                                  max_tokens=max_tokens, extra_body=extra, **fields)  # fmt: skip

        choice = ask(ONE_CALL).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call-")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)

        calls, reason, text = _streamed(ask(ONE_CALL, stream=True))
        assert reason == "tool_calls" and text == "Let me check."
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]

        both = ask(TWO_CALLS, max_tokens=120).choices[0]
        assert [c.function.name for c in both.message.tool_calls] == ["get_weather", "get_time"], both
        calls, reason, _ = _streamed(ask(TWO_CALLS, max_tokens=120, stream=True, parallel_tool_calls=False))
        assert [c["name"] for c in calls] == ["get_weather"] and reason == "tool_calls"  # the first call only

        cut = ask(ONE_CALL, max_tokens=30).choices[0]  # the call never closes (42 tokens): the answer is its text
        assert cut.finish_reason == "length" and cut.message.tool_calls is None
        assert cut.message.content.startswith('Let me check.\n<tool_call>\n{"name": "get_weather"')

        # no call in the answer: auto's text is exactly what tool_choice "none" answers (same prompt, same greedy tokens)
        plain, none = ask(max_tokens=24).choices[0], ask(max_tokens=24, tool_choice="none").choices[0]
        if "<tool_call>" not in none.message.content:
            assert (plain.message.content, plain.message.tool_calls) == (none.message.content, None)
            assert plain.finish_reason == none.finish_reason
        else:  # the model wrote a call itself: read out, or (cut off) left as the text
            assert plain.message.tool_calls or "<tool_call>" in plain.message.content


def test_auto_without_a_parser_is_a_400_naming_the_flag(tiny_server, live_server):
    tool = {"type": "function", "function": {"name": "f"}}
    with live_server(tiny_server) as url:
        for extra in ({}, {"tool_choice": "auto"}):
            r = post_json(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                       "tools": [tool], **extra})  # fmt: skip
            assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
            assert "--tool-call-parser hermes" in r.json()["error"]["message"]


def test_the_cli_flag_takes_a_name_or_a_json_template(tmp_path, capsys):
    from llmspeed.serving.cli import build_parser
    from llmspeed.serving.tool_parser import HERMES

    parser = build_parser()
    assert parser.parse_args(["--tool-call-parser", "hermes"]).tool_call_parser == "hermes"
    path = tmp_path / "template.json"
    path.write_text(json.dumps(HERMES))
    assert parser.parse_args(["--tool-call-parser", str(path)]).tool_call_parser == HERMES
    path.write_text(json.dumps({"fields": {}}))
    for bad, said in (("mistral", "expected hermes, or a JSON file"), (str(path), "not one transformers can read")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--tool-call-parser", bad])
        assert said in capsys.readouterr().err


def test_qwen_models_read_hermes_calls_without_the_flag_and_llama_needs_it():
    from llmspeed.models import tiny
    from llmspeed.serving import Engine
    from llmspeed.serving.server import OpenAIServer
    from llmspeed.serving.tool_parser import HERMES
    from tests.generation.test_engine import ChatTokenizer

    for architecture, template in (("qwen2", HERMES), ("qwen3", HERMES), ("llama", None)):
        model = tiny(architecture)
        model.tokenizer = ChatTokenizer()
        server = OpenAIServer(Engine(model, kv_cache_tokens=256), "tiny")
        try:
            assert server.response_template is template, architecture
        finally:
            server.engine.close()
