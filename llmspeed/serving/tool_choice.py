"""Forced tool calls: ``tool_choice: "required"`` or a named function, answered as vLLM answers them without a
tool-call parser. The answer is constrained by a JSON schema (structured outputs) and handed back as the message's
``tool_calls`` rather than its text:

* a named function (``{"type": "function", "function": {"name": "get_weather"}}``): the output is that function's
  ``parameters`` object; one call whose ``arguments`` are the output, ``finish_reason: "stop"`` (OpenAI's and vLLM's);
* ``"required"``: the output is a JSON array of ``{"name": <a tool's name>, "parameters": <its arguments>}``, at least
  one; a call each, ``finish_reason: "tool_calls"``.

``"auto"`` needs the model's own tool-call format parsed out of free text, which differs by model family: it stays a
400 (:meth:`~.chat_request.ChatCompletionRequest.check`).
"""

from __future__ import annotations

import json
from typing import Any

from .openai_responses import new_id

ANY_OBJECT: dict[str, Any] = {"type": "object"}


class ToolChoiceError(ValueError):
    """A ``tool_choice`` that names no tool of the request, or has another shape."""


def forced_name(tool_choice: Any) -> str | None:
    """The function a named ``tool_choice`` forces (``None`` for the string choices)."""
    if not isinstance(tool_choice, dict):
        return None
    function = tool_choice.get("function")
    if tool_choice.get("type") != "function" or set(tool_choice) != {"type", "function"} or not isinstance(function, dict) \
            or set(function) != {"name"} or not isinstance(function["name"], str):  # fmt: skip
        raise ToolChoiceError(f"a named tool_choice is {{'type': 'function', 'function': {{'name': <a tool's name>}}}}; "
                              f"got {tool_choice!r}")  # fmt: skip
    return function["name"]


def forced_schema(tools: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema a forced ``tool_choice`` puts on the answer (``None`` when it forces nothing); ``tools`` are the
    request's (``{"type": "function", "function": {"name", "parameters", ...}}``)."""
    functions = {t["function"]["name"]: t["function"].get("parameters") or ANY_OBJECT for t in tools}
    name = forced_name(tool_choice)
    if name is not None:
        if name not in functions:
            raise ToolChoiceError(f"tool_choice names the function {name!r}, which is not in tools {sorted(functions)}")
        return functions[name]
    if tool_choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [n]}, "parameters": p},
              "required": ["name", "parameters"], "additionalProperties": False} for n, p in functions.items()]
    return {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": new_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_calls(tool_choice: Any, text: str) -> list[dict[str, Any]] | None:
    """The ``tool_calls`` of a forced answer's ``text``; ``None`` when ``"required"``'s text is not a complete array
    of calls (cut off at ``max_tokens``: the text is then the message's content)."""
    name = forced_name(tool_choice)
    if name is not None:
        return [_call(name, text)]  # cut off too: the arguments as far as they got, as vLLM returns them
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) and {"name", "parameters"} <= set(c) for c in calls):
        return None
    return [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]


def message(tool_choice: Any, text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
    """A forced answer's chat ``message`` and OpenAI finish reason (``"tool_calls"`` for ``"required"``'s complete
    calls, else the answer's own)."""
    calls = tool_calls(tool_choice, text)
    if calls is None:
        return {"role": "assistant", "content": text}, finish_reason
    reason = "tool_calls" if tool_choice == "required" and finish_reason == "stop" else finish_reason
    return {"role": "assistant", "content": None, "tool_calls": calls}, reason


def with_tool_calls(response: dict[str, Any], tool_choice: Any) -> dict[str, Any]:
    """A whole ``chat.completion`` response with each choice's text turned into its ``tool_calls`` (:func:`message`)."""
    for choice in response["choices"]:
        choice["message"], choice["finish_reason"] = message(tool_choice, choice["message"]["content"],
                                                             choice["finish_reason"])  # fmt: skip
    return response


class ToolDeltas:
    """One streamed choice's ``delta`` objects under a forced ``tool_choice``: a named function's call opens at the
    first text and its ``arguments`` stream as they come; ``"required"``'s calls come whole with the last chunk (the
    array is parsed only once it is complete)."""

    def __init__(self, tool_choice: Any):
        self.tool_choice = tool_choice
        self.name = forced_name(tool_choice)
        self.text = ""

    def delta(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The delta for the event's new ``text`` (and, on the last event, its OpenAI ``finish_reason``)."""
        first, self.text = not self.text, self.text + text
        if self.name is not None:
            if not text:
                return {}, finish_reason
            call = _call(self.name, text) if first else {"function": {"arguments": text}}  # the call opens once
            return {"tool_calls": [{"index": 0, **call}]}, finish_reason
        if finish_reason is None:
            return {}, None
        whole, reason = message(self.tool_choice, self.text, finish_reason)
        if whole["content"] is not None:
            return {"content": whole["content"]}, reason
        return {"tool_calls": [{"index": k, **c} for k, c in enumerate(whole["tool_calls"])]}, reason


__all__ = ["ToolChoiceError", "ToolDeltas", "forced_name", "forced_schema", "message", "tool_calls", "with_tool_calls"]
