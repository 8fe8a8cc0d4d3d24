"""Tool calls read out of free text (``tool_choice: "auto"``, :mod:`llmspeed.serving.tool_parser`): the whole answer
against transformers' own ``parse_response``, streamed pieces against the whole answer (hypothesis), and what a call
that does not parse becomes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspeed.serving.tool_parser import HERMES, ToolCallStream, merge, parsed_message, response_template

pytest.importorskip("transformers.utils.chat_parsing")

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
CALL2 = '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
TEXTS = [
    "Plain text, no call.",
    CALL,
    "Let me look that up.\n" + CALL,
    "Two at once.\n" + CALL + "\n" + CALL2,
    "<think>The user wants Paris.</think>" + CALL,
    'Broken: <tool_call>{"name": "get_weather", "argu',  # cut off at max_tokens
    'Not JSON <tool_call>{name: get_weather}</tool_call> and after',
    "Ends on half a tag <tool_ca",
    'No name: <tool_call>{"arguments": {}}</tool_call>',
    "",
]


def _calls(message: dict) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []]


@pytest.mark.parametrize("text", TEXTS[:5])
def test_whole_answers_read_as_transformers_parse_response_reads_them(text):
    from transformers.utils.chat_parsing.response_parser import parse_response

    reference = parse_response(text, HERMES, prefix="")
    message, reason = parsed_message(HERMES, None, text, "stop")
    assert _calls(message) == [(c["function"]["name"], c["function"]["arguments"]) for c in reference.get("tool_calls", [])]
    assert (message["content"] or None) == (reference.get("content") or None)
    assert message.get("reasoning_content") == reference.get("reasoning_content")
    assert reason == ("tool_calls" if reference.get("tool_calls") else "stop")
    assert all(c["id"].startswith("call-") and c["type"] == "function" for c in message.get("tool_calls", []))


def test_a_call_that_does_not_parse_leaves_the_answer_as_its_text():
    for text in TEXTS[5:]:
        message, reason = parsed_message(HERMES, None, text, "length")
        assert message == {"role": "assistant", "content": text} and reason == "length", text
    message, reason = parsed_message(HERMES, None, CALL + ' then <tool_call>{"oops"</tool_call>', "stop")
    assert _calls(message) == [("get_weather", {"city": "Paris", "unit": "celsius"})] and reason == "tool_calls"
    assert message["content"] == ' then <tool_call>{"oops"</tool_call>'  # the first call kept, the rest as text


def test_a_length_cut_answer_keeps_its_reason_and_parallel_false_keeps_the_first_call():
    message, reason = parsed_message(HERMES, None, CALL, "length")
    assert reason == "length" and len(message["tool_calls"]) == 1
    message, reason = parsed_message(HERMES, None, CALL + CALL2, "stop", max_calls=1)
    assert _calls(message) == [("get_weather", {"city": "Paris", "unit": "celsius"})] and reason == "tool_calls"


def test_arguments_are_cast_by_the_tools_parameter_schemas_as_transformers_casts_them():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}}}]  # fmt: skip
    message, _ = parsed_message(HERMES, tools, '<tool_call>{"name": "f", "arguments": {"n": "7", "s": "7"}}</tool_call>',
                                "stop")  # fmt: skip
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"n": 7, "s": "7"}


@settings(max_examples=60, deadline=None)
@given(text=st.sampled_from(TEXTS), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streamed_pieces_put_together_equal_the_whole_answer(text, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    stream = ToolCallStream(HERMES)
    deltas = [stream.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [stream.finish()]
    streamed = merge(*deltas)
    whole, _ = parsed_message(HERMES, None, text, "stop")
    assert (streamed.get("content") or None) == (whole["content"] or None)
    assert streamed.get("reasoning_content") == whole.get("reasoning_content")
    assert [c["index"] for c in streamed.get("tool_calls", [])] == list(range(len(whole.get("tool_calls", []))))
    assert _calls(streamed) == _calls(whole)
    # every character goes out once: as text, or inside a call, or as a delimiter
    assert "".join(d.get("content", "") for d in deltas) == streamed.get("content", "")


def test_a_call_goes_out_only_once_it_closes():
    stream = ToolCallStream(HERMES)
    assert stream.feed("Checking. <tool_") == {"content": "Checking."}
    assert stream.feed('call>{"name": "get_time", "arguments": {"zone": "C') == {}
    delta = stream.feed('ET"}}</tool_call>')
    assert [c["function"] for c in delta["tool_calls"]] == [{"name": "get_time", "arguments": '{"zone": "CET"}'}]
    assert stream.finish() == {} and stream.calls == 1


def test_templates_are_checked_when_the_server_is_configured():
    class Tok:
        response_template = HERMES

    assert response_template(Tok(), None) is HERMES and response_template(object(), None) is None
    assert response_template(None, "hermes") is HERMES
    with pytest.raises(ValueError, match=r"tool_call_parser must be one of \['hermes'\].*'mistral'"):
        response_template(None, "mistral")
    with pytest.raises(ValueError, match="tool_call_parser: the response template is not one transformers can read"):
        response_template(None, {"fields": {"tool_calls": {"open": "<a>", "close": "</a>"}}})  # no start_anchor
    with pytest.raises(ValueError, match="has no 'tool_calls' field; it has \\['content'\\]"):
        response_template(None, {"start_anchor": "x", "fields": {"content": {"content": "text"}}})


def test_a_transformers_without_response_templates_leaves_auto_a_400_or_names_the_flag(monkeypatch):
    """transformers >= 5.0 is allowed and the response templates came later in the 5.x series: a Qwen model served
    with an older one must still start (auto stays a 400), and an explicit ``tool_call_parser`` says what is missing."""
    import sys

    from llmspeed.serving import tool_parser

    class Tok:
        response_template = HERMES

    monkeypatch.setitem(sys.modules, "transformers.utils.chat_parsing.response_parser", None)  # import fails
    assert not tool_parser._readable()
    assert response_template(object(), None, "qwen2") is None and response_template(Tok(), None) is None
    with pytest.raises(ValueError, match=r"tool_call_parser needs transformers' response templates.*pip install -U"):
        response_template(None, "hermes")
