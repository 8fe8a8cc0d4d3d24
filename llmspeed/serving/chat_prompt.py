"""The prompt of a chat request, and the refusal of tool fields the model's chat template would drop.

Messages reach the template with every field they carry (``name``, ``tool_calls``, ``tool_call_id``, ...), as
vLLM hands them over; a template ignores what it does not know. That is fine for a ``name``, but not for the
tool parts of a conversation: ``tools``, an assistant's ``tool_calls`` and a ``tool`` turn. Each of those is
checked by rendering the conversation with and without it: if the template renders the same text either way
(SmolLM2's ignores ``tools`` and ``tool_calls``), or fails on it, the request is a 400 naming the field rather
than an answer to a conversation the model never saw.

An assistant's tool calls reach the template with their ``function.arguments`` as the object they encode: OpenAI
sends the arguments as JSON text, and transformers' templates write them with ``| tojson``, which would write a
string quoted and escaped (``"{\\"city\\": ...}"``); vLLM parses them too.

The server calls :func:`chat_prompt_off_loop`: those renderings (up to one per tool part, plus one) run on a
worker thread, so a slow template never stalls the event loop and the other requests it serves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, NoReturn

from ..generation.chat_content import template_messages
from .api_errors import APIError

Messages = list[dict[str, Any]]
Tools = list[dict[str, Any]] | None
Part = tuple[str, str, Callable[[], tuple[Messages, Tools]]]  # (param, what it is, the request without it)


def chat_prompt(tokenizer: Any, messages: Messages, tools: Tools = None,
                options: dict[str, Any] | None = None) -> Messages | list[int]:  # fmt: skip
    """What to submit for a chat request: ``messages`` (their tool calls' JSON arguments parsed; the engine renders
    them), or, with ``tools`` or template ``options`` (``add_generation_prompt``, ``continue_final_message`` and the
    request's ``chat_template_kwargs``: the engine renders with none), the token ids of the conversation rendered with
    them. Content parts reach the template here as they reach it in the engine
    (:func:`~llmspeed.generation.chat_content.template_messages`).

    Raises:
        APIError: 400 naming ``tools``, ``messages.{i}.tool_calls`` or ``messages.{i}.role`` (a ``tool`` turn)
            when the chat template drops it or cannot render it; naming the first option when the template cannot
            render the messages with the options, or the model has no template to take them.
    """
    messages = _parsed_arguments(messages)
    parts = _tool_parts(messages, tools)
    options = options or {}
    template = getattr(tokenizer, "chat_template", None)
    if options and template is None:
        raise APIError(400, f"{next(iter(options))} is a chat template option, and this model has no chat template",
                       next(iter(options)))
    if (not parts and not options) or template is None:
        return messages  # nothing to check, or no template: the engine refuses the request itself
    try:  # content parts as the template takes them (joined for one that writes text), as the engine renders them
        messages = template_messages(tokenizer, messages, tools)
    except ValueError as err:
        raise APIError(400, str(err), "messages") from None
    parts = _tool_parts(messages, tools)
    if parts:  # each tool part must change the text: rendered with and without it
        try:
            full = _render(tokenizer, messages, tools, tokenize=False, options=options)
        except Exception as err:
            _refuse_options(options, err)
            _refuse_failing(tokenizer, messages, tools, parts, err)
        for param, what, without in parts:
            try:
                if _render(tokenizer, *without(), tokenize=False, options=options) == full:
                    raise APIError(400, f"this model's chat template does not render {what}: the prompt is the same "
                                        f"with or without, so {param} is refused rather than dropped silently", param)
            except APIError:
                raise
            except Exception:  # the template needs this part to render the rest: it renders it
                pass
    if tools is None and not options:
        return messages
    try:
        ids = _render(tokenizer, messages, tools, tokenize=True, options=options)
    except Exception as err:  # with tools it rendered above; with options alone this is its first rendering
        _refuse_options(options, err)
        raise
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    return [int(t) for t in ids]


def _refuse_options(options: dict[str, Any], err: Exception) -> None:
    """With template ``options``, the 400 for a rendering that raised ``err``, naming the first option; else nothing."""
    if options:
        raise APIError(400, f"the chat template cannot render these messages with {sorted(options)} "
                            f"({type(err).__name__}: {err})", next(iter(options))) from None


async def chat_prompt_off_loop(tokenizer: Any, messages: Messages, tools: Tools = None,
                               options: dict[str, Any] | None = None) -> Messages | list[int]:  # fmt: skip
    """:func:`chat_prompt` with its template renderings on a worker thread (``asyncio.to_thread``), raising the
    same :class:`APIError`; a request without tool parts or template options, which renders nothing here, returns at
    once."""
    if not _tool_parts(messages, tools) and not options:
        return messages
    return await asyncio.to_thread(chat_prompt, tokenizer, messages, tools, options)


def _parsed_arguments(messages: Messages) -> Messages:
    """``messages`` with each tool call's ``function.arguments`` that is the JSON text of an object parsed to that
    object (new dicts: the caller's stay as they are); other arguments stay as given."""

    def parsed(call: dict[str, Any]) -> dict[str, Any]:
        function = call.get("function")
        if not isinstance(function, dict):
            return call
        args = function.get("arguments")
        try:
            value = json.loads(args) if isinstance(args, str) else None
        except ValueError:  # not JSON (a model's own malformed call, echoed back): the template writes it as it is
            value = None
        return {**call, "function": {**function, "arguments": value}} if isinstance(value, dict) else call

    return [{**m, "tool_calls": [parsed(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


def _render(tokenizer: Any, messages: Messages, tools: Tools, tokenize: bool, options: dict[str, Any] | None = None) -> Any:
    extra = {"tools": tools} if tools is not None else {}
    kwargs = {"add_generation_prompt": True, **(options or {})}
    return tokenizer.apply_chat_template(messages, tokenize=tokenize, **extra, **kwargs)


def _tool_parts(messages: Messages, tools: Tools) -> list[Part]:
    """``(param, what, without)`` for each tool part of the request; ``without()`` is the request without it."""
    parts: list[Part] = []
    if tools is not None:
        parts.append(("tools", "tools", lambda: (messages, None)))
    for i, m in enumerate(messages):
        if m.get("tool_calls"):
            def without_calls(i: int = i) -> tuple[Messages, Tools]:
                return [{k: v for k, v in m.items() if k != "tool_calls"} if j == i else m
                        for j, m in enumerate(messages)], tools

            parts.append((f"messages.{i}.tool_calls", "an assistant message's tool_calls", without_calls))
        if m["role"] == "tool":
            def without_turn(i: int = i) -> tuple[Messages, Tools]:
                return messages[:i] + messages[i + 1:], tools

            parts.append((f"messages.{i}.role", "a 'tool' message", without_turn))
    return parts


def _refuse_failing(tokenizer: Any, messages: Messages, tools: Tools, parts: list[Part], err: Exception) -> NoReturn:
    """Raise the 400 for a conversation the template cannot render: naming the first tool part without which it
    renders, else ``messages``."""
    reason = f"{type(err).__name__}: {err}"
    for param, what, without in parts:
        try:
            _render(tokenizer, *without(), tokenize=False)
        except Exception:
            continue
        raise APIError(400, f"this model's chat template cannot render {what} ({reason})", param) from None
    raise APIError(400, f"the chat template cannot render these messages ({reason})", "messages") from None
