"""Tool calls parsed out of free text: ``tool_choice: "auto"`` (the default when a request has ``tools``), as vLLM's
``--enable-auto-tool-choice --tool-call-parser`` and ``transformers serve`` answer it.

Where a model writes its calls differs by family, so the format is data: a *response template*, the declarative
format of transformers (``tokenizer.response_template``; the regions of an answer: ``content``, ``tool_calls``,
``reasoning_content``, each with the delimiters that open and close it). transformers' streaming ``ResponseParser``
reads the answer against it, and :class:`ToolCallStream` turns what it reads into OpenAI's ``delta`` objects:

* ``content`` (and ``reasoning_content`` when the template has a reasoning region) as it comes;
* each call whole, ``{"index", "id", "type": "function", "function": {"name", "arguments"}}``, once its closing
  delimiter is read (``arguments`` as a JSON string, cast by the tool's parameter schema as transformers casts it).

The whole answer (:func:`parsed_message`) is the same deltas put together, so a streamed answer and a whole one never
differ. A call that does not parse (not JSON, no name, cut off at ``max_tokens``) ends the parsing: from there on the
text goes out as content, as vLLM's parsers hand back text they cannot read.

:data:`TEMPLATES` has ``"hermes"``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the format of the
Hermes and Qwen 2/2.5/3 models and of many fine-tunes (vLLM's ``hermes`` parser).
"""

from __future__ import annotations

import json
from typing import Any

from .openai_responses import new_id

HERMES: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",  # required by the format; the parser here reads the answer alone
    "fields": {
        "reasoning_content": {"open": "<think>", "close": "</think>", "content": "text"},
        "tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>)", "content": "text"},
    },
}  # fmt: skip
TEMPLATES: dict[str, dict[str, Any]] = {"hermes": HERMES}
# model families whose chat templates write Hermes calls: read with HERMES when nothing else is said (as transformers
# serve falls back by model_type)
HERMES_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next")
_TEXT_FIELDS = ("content", "reasoning_content")


def response_template(tokenizer: Any, tool_call_parser: str | dict[str, Any] | None,
                      model_type: str | None = None) -> dict[str, Any] | None:  # fmt: skip
    """The response template ``tool_choice: "auto"`` parses answers with (``None``: it cannot be answered).

    ``tool_call_parser`` is a name in :data:`TEMPLATES`, a response template itself, or ``None`` for the tokenizer's
    own ``response_template`` when it has one, else :data:`HERMES` for a ``model_type`` of
    :data:`HERMES_MODEL_TYPES` (Qwen 2 and 3).

    Raises:
        ValueError: an unknown name, or a template transformers refuses (the message names ``tool_call_parser``).
    """
    if tool_call_parser is None:
        template = getattr(tokenizer, "response_template", None)
        if template is None:
            template = HERMES if model_type in HERMES_MODEL_TYPES else None
        if template is None or not _readable():  # a transformers without response templates reads no calls
            return None
    elif isinstance(tool_call_parser, str):
        if tool_call_parser not in TEMPLATES:
            raise ValueError(f"tool_call_parser must be one of {sorted(TEMPLATES)} or a response template (a dict); "
                             f"got {tool_call_parser!r}")
        template = TEMPLATES[tool_call_parser]
    else:
        template = tool_call_parser
    if not _readable():
        raise ValueError("tool_call_parser needs transformers' response templates (transformers.utils.chat_parsing), "
                         "which the installed transformers does not have: pip install -U transformers")
    from transformers.utils.chat_parsing.response_templates import load_response_template

    try:
        load_response_template(template)
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # fields of the wrong kind, a bad pattern
        raise ValueError(f"tool_call_parser: the response template is not one transformers can read: {err}") from None
    if "tool_calls" not in template.get("fields", {}):
        raise ValueError(f"tool_call_parser: the response template has no 'tool_calls' field; it has "
                         f"{sorted(template.get('fields', {}))}")  # fmt: skip
    return template


def _readable() -> bool:
    """Whether the installed transformers reads response templates (added in the 5.x series)."""
    try:
        from transformers.utils.chat_parsing.response_parser import ResponseParser  # noqa: F401
    except ImportError:
        return False
    return True


def _call(value: Any, index: int) -> dict[str, Any]:
    """One parsed ``tool_calls`` region as an OpenAI call; ``ValueError`` when it is not ``{name, arguments}``."""
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"a tool call needs a name; read {value!r}")
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"index": index, "id": new_id("call"), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}  # fmt: skip


class ToolCallStream:
    """One answer's parser: :meth:`feed` its text as it comes, :meth:`finish` at its end; each returns one OpenAI
    ``delta`` (``{}`` when nothing is ready to go out).

    Args:
        template: A response template (:func:`response_template`).
        tools: The request's ``tools``, whose parameter schemas cast the calls' arguments.
        max_calls: Calls handed out at most (``parallel_tool_calls: false`` is 1, as vLLM: the first call); later
            ones are read and dropped.
    """

    def __init__(self, template: dict[str, Any], tools: list[dict[str, Any]] | None = None, max_calls: int | None = None):
        self._template, self._tools = template, tools
        self._parser = self._fresh()
        self.calls = 0  # tool calls handed out so far
        self._text = ""  # every character fed
        self._sent = 0  # how far into _text the text handed out reaches
        self._failed = False
        self.max_calls = max_calls

    def _fresh(self) -> Any:  # transformers' ResponseParser, reading the answer alone (no prompt before it)
        from transformers.utils.chat_parsing.response_parser import ResponseParser

        tools: Any = self._tools
        return ResponseParser(self._template, prefix="", tools=tools)

    def _delta(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """The delta of ``events``; all or nothing (a call without a name raises before anything counts as sent)."""
        delta: dict[str, Any] = {}
        sent, calls = self._sent, self.calls
        for event in events:
            field = event.get("field")
            if event["type"] == "region_chunk" and field in _TEXT_FIELDS and not event.get("dirty") and event["text"]:
                delta[field] = delta.get(field, "") + event["text"]
                at = self._text.find(event["text"], sent)  # text regions are the answer's own characters
                sent = sent if at < 0 else at + len(event["text"])
            elif event["type"] == "region_close" and field == "tool_calls":
                call = _call(event.get("value"), calls)  # read (ValueError) even when dropped
                if self.max_calls is None or calls < self.max_calls:
                    delta.setdefault("tool_calls", []).append(call)
                    calls += 1
        self._sent, self.calls = sent, calls
        return delta

    def _read(self, text: str, final: bool) -> dict[str, Any]:
        if self._failed:
            return self._rest()
        try:
            return self._delta(self._parser.finalize()[1] if final else self._parser.feed(text))
        except ValueError:  # a call that does not parse: what came before it goes out, the rest is text
            return self._reread(text, final)

    def _reread(self, text: str, final: bool) -> dict[str, Any]:
        """Read ``text`` again a character at a time after its first reading failed (its events were lost with the
        error), handing out what precedes the failure; from there on everything is text."""
        self._parser = self._fresh()
        self._parser.feed(self._text[: len(self._text) - len(text)])  # read before without error; handed out already
        delta: dict[str, Any] = {}
        try:
            for ch in text:
                delta = merge(delta, self._delta(self._parser.feed(ch)))
            if final:
                delta = merge(delta, self._delta(self._parser.finalize()[1]))
        except ValueError:
            self._failed = True
            return merge(delta, self._rest())
        return delta  # read a character at a time it did not fail (it never happens with transformers' parser)

    def _rest(self) -> dict[str, Any]:
        rest, self._sent = self._text[self._sent :], len(self._text)
        return {"content": rest} if rest else {}

    def feed(self, text: str) -> dict[str, Any]:
        """The delta ``text`` completes (text held back while it may still open a region, calls once they close)."""
        self._text += text
        return self._read(text, final=False)

    def finish(self) -> dict[str, Any]:
        """The delta the end of the answer completes (held-back text; a call left open is text: it did not parse)."""
        return self._read("", final=True)


def merge(*deltas: dict[str, Any]) -> dict[str, Any]:
    """Deltas one after the other as one delta (texts joined, calls listed in order)."""
    out: dict[str, Any] = {}
    for delta in deltas:
        for key, value in delta.items():
            out[key] = out.get(key, [] if key == "tool_calls" else "") + value
    return out


def finish_reason(stream: ToolCallStream, reason: str | None) -> str | None:
    """OpenAI's finish reason: ``"tool_calls"`` for an answer that stopped after handing out calls."""
    return "tool_calls" if reason == "stop" and stream.calls else reason


def parsed_message(template: dict[str, Any], tools: list[dict[str, Any]] | None, text: str, reason: str,
                   max_calls: int | None = None) -> tuple[dict[str, Any], str]:  # fmt: skip
    """A whole answer's chat ``message`` (``content`` ``None`` when it is only calls) and OpenAI finish reason."""
    stream = ToolCallStream(template, tools, max_calls)
    whole = merge(stream.feed(text), stream.finish())
    message: dict[str, Any] = {"role": "assistant", "content": whole.get("content") or None}
    if whole.get("reasoning_content"):
        message["reasoning_content"] = whole["reasoning_content"]
    if whole.get("tool_calls"):
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in whole["tool_calls"]]
    elif message["content"] is None:
        message["content"] = ""  # no calls: the answer is its text, even an empty one
    return message, finish_reason(stream, reason) or reason


def with_parsed_calls(response: dict[str, Any], template: dict[str, Any], tools: list[dict[str, Any]] | None,
                      max_calls: int | None = None) -> dict[str, Any]:  # fmt: skip
    """A whole ``chat.completion`` response with each choice's calls read out of its text (:func:`parsed_message`)."""
    for choice in response["choices"]:
        choice["message"], choice["finish_reason"] = parsed_message(template, tools, choice["message"]["content"],
                                                                    choice["finish_reason"], max_calls)  # fmt: skip
    return response


__all__ = ["HERMES", "HERMES_MODEL_TYPES", "TEMPLATES", "ToolCallStream", "finish_reason", "merge", "parsed_message", "response_template",
           "with_parsed_calls"]
