"""The OpenAI Responses API's request (``POST /v1/responses``), read into the chat completions request it asks for.

A Responses request is a chat request in other words: ``input`` (a string, or a list of messages and of the
``function_call`` / ``function_call_output`` items a previous answer and its tool results make) and ``instructions``
become ``messages``; ``max_output_tokens`` is ``max_completion_tokens``; ``text.format`` is ``response_format``; a
function tool ``{"type": "function", "name", "parameters"}`` is ``{"type": "function", "function": {...}}``;
``include: ["message.output_text.logprobs"]`` with ``top_logprobs`` is ``logprobs``. :meth:`ResponsesRequest.chat_payload`
writes that request, the server answers it as a chat request, and :mod:`.responses_output` writes the answer back
as a Responses object or event stream (as ``transformers serve`` and vLLM map one onto the other).

``previous_response_id`` and ``store: true`` need a server that keeps responses (:mod:`.responses_store`, which
hands the request its stored conversation); without one, and for what this server does not run (``conversation``
objects, ``background``, hosted tools, images, files), they are a 400 naming the field; an error found once the request
is read as a chat request names the Responses field it came from (:meth:`ResponsesRequest.renamed`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..names import shown as _shown
from .api_errors import APIError
from .openai_protocol import StrictRequest

LOGPROBS = "message.output_text.logprobs"
ROLES = ("user", "system", "developer", "assistant")
# parts a message's content may hold -> the chat part it is (a refusal is an assistant's earlier answer)
_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
# vLLM's sampling extensions, passed to the chat request under the same names (its errors name them so)
EXTENSIONS = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop",
              "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output", "allowed_token_ids",
              "bad_words", "priority", "skip_special_tokens")  # fmt: skip
# chat request field -> the Responses field it came from (for errors found in the chat request)
_RENAMED = {"max_completion_tokens": "max_output_tokens", "response_format.json_schema": "text.format",
            "response_format": "text.format", "logprobs": "include"}


class StreamOptions(BaseModel):
    """``stream_options``: ``include_obfuscation`` taken and ignored (no event is padded against side channels)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_obfuscation: bool | None = None


class ResponsesRequest(StrictRequest):
    """``POST /v1/responses``: OpenAI's fields (strict types, unknown fields refused) and vLLM's sampling extensions."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # kept by a server with a response store (.responses_store); else store: true and previous_response_id are refused
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    reasoning: dict[str, Any] | None = None
    # what needs a conversation object, a background run or a hosted feature: refused in check()
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    # vLLM's extensions (checked by the chat request, which names them alike)
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    priority: int | None = None
    skip_special_tokens: bool | None = None
    _history: list[dict[str, Any]] = PrivateAttr(default_factory=list)  # previous_response_id's conversation
    _keep: Callable[[dict[str, Any]], None] | None = PrivateAttr(default=None)  # stores the response, when one is kept

    # --- stored responses (.responses_store) ------------------------------------------------------
    def refuse_store(self) -> None:
        """On a server that keeps no responses: a 400 for ``previous_response_id`` and for ``store: true``."""
        start = "start the server with --enable-responses-store"
        if self.previous_response_id is not None:
            raise APIError(400, f"this server keeps no responses: send the whole conversation in input, or {start}",
                           "previous_response_id")
        if self.store:
            raise APIError(400, f"store: true asks to keep the response for later retrieval, which this server does not "
                                f"do; send store: false or leave it out, or {start}", "store")  # fmt: skip

    def continues(self, items: list[dict[str, Any]]) -> None:
        """Run after ``items`` (the stored conversation of ``previous_response_id``), before this request's input."""
        self._history = list(items)

    def keeping(self, keep: Callable[[dict[str, Any]], None]) -> None:
        """Store the response once it is complete (or incomplete) by calling ``keep`` with it."""
        self._keep = keep

    @property
    def stored(self) -> bool:
        """Whether the response is kept (its ``store`` field)."""
        return self._keep is not None

    def kept(self, response: dict[str, Any]) -> None:
        """Hand the finished ``response`` object to the store, when it is kept."""
        if self._keep is not None:
            self._keep(response)

    def conversation_items(self) -> list[dict[str, Any]]:
        """The conversation this request runs, as Responses input items: ``previous_response_id``'s, then its input
        (a string or a bare list of parts as one user message)."""
        given = self.input
        if isinstance(given, str) or all("role" not in item and item.get("type") in _PARTS for item in given):
            return [*self._history, {"type": "message", "role": "user", "content": given}]
        return [*self._history, *given]

    def check(self) -> None:
        """Refuse what this server cannot answer: a conversation object or a background response, hosted features,
        reasoning settings; ``stream_options`` without ``stream``; an ``include`` it cannot fill."""
        refused = [
            (self.conversation is not None, "conversation", "this server keeps no conversation objects: send the "
                                                            "whole conversation in input, or previous_response_id "
                                                            "to a server started with --enable-responses-store"),
            (bool(self.background), "background", "background responses need a stored response to poll; send "
                                                  "background: false or leave it out"),
            (self.prompt is not None, "prompt", "prompt templates are stored on OpenAI's platform; send the text in "
                                                "input and instructions"),
            (self.truncation == "auto", "truncation", "truncation 'auto' (dropping earlier input to fit) is not done "
                                                      "here; send 'disabled' or leave it out"),
            (self.max_tool_calls is not None and self.max_tool_calls > 1, "max_tool_calls",
             f"max_tool_calls: 1 (or parallel_tool_calls: false) keeps the first call; other limits are not applied "
             f"here; got {self.max_tool_calls}"),
            (bool(self.reasoning), "reasoning", f"reasoning settings are not applied to this model; leave reasoning "
                                                f"out (got {_shown(self.reasoning)})"),
            (self.stream_options is not None and not self.stream, "stream_options",
             "stream_options is only allowed with stream: true; got stream: false"),
        ]  # fmt: skip
        for bad, param, message in refused:
            if bad:
                raise APIError(400, message, param)
        for i, item in enumerate(self.include or []):
            if item != LOGPROBS:
                raise APIError(400, f"include.{i}: this server can include {[LOGPROBS]}; got {item!r}", f"include.{i}")

    # --- the chat request -------------------------------------------------------------------------
    def chat_payload(self) -> tuple[dict[str, Any], list[str]]:
        """The chat completions request this one asks for, and for each of its messages the Responses field it came
        from (``"instructions"``, ``"input"``, ``"input.3"``), which :meth:`renamed` puts in errors."""
        messages, origins = self._messages()
        chat: dict[str, Any] = {"model": self.model, "messages": messages, "stream": self.stream}
        # only the sampling fields given: one left out takes the server's default (the model's generation config)
        chat.update({k: getattr(self, k) for k in ("temperature", "top_p") if k in self.model_fields_set})
        if self.stream:  # the final event carries the usage
            chat["stream_options"] = {"include_usage": True}
        if self.max_output_tokens is not None:
            chat["max_completion_tokens"] = self.max_output_tokens
        if self.tools is not None:
            chat["tools"] = [self._tool(i, t) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            chat["tool_choice"] = self._tool_choice()
        if not self.parallel_tool_calls or self.max_tool_calls == 1:
            chat["parallel_tool_calls"] = False
        fmt = self.text_format()
        if fmt is not None:
            chat["response_format"] = fmt
        if self.wants_logprobs:
            chat["logprobs"], chat["top_logprobs"] = True, self.top_logprobs or 0
        chat.update({k: getattr(self, k) for k in EXTENSIONS if getattr(self, k) is not None})
        return chat, origins

    @property
    def wants_logprobs(self) -> bool:
        """Whether the answer's text carries log-probabilities (``include`` names them, or ``top_logprobs`` is set)."""
        return LOGPROBS in (self.include or []) or self.top_logprobs is not None

    def _messages(self) -> tuple[list[dict[str, Any]], list[str]]:
        messages: list[dict[str, Any]] = []
        origins: list[str] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
            origins.append("instructions")
        self._read_items([("previous_response_id", item) for item in self._history], messages, origins)
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}], [*origins, "input"]
        if not self.input:
            raise APIError(400, "input is empty: give a string or a list of messages", "input")
        if all("role" not in item and item.get("type") in _PARTS for item in self.input):  # a bare list of parts
            return [*messages, {"role": "user", "content": self._parts("input", self.input)}], [*origins, "input"]
        self._read_items([(f"input.{i}", item) for i, item in enumerate(self.input)], messages, origins)
        return messages, origins

    def _read_items(self, items: list[tuple[str, dict[str, Any]]], messages: list[dict[str, Any]],
                    origins: list[str]) -> None:  # fmt: skip
        """Append the chat messages of input ``items`` (each with the field it came from) to ``messages``."""
        reasoning = None
        for at, item in items:
            kind = item.get("type", "message" if "role" in item else None)
            if kind == "message":
                role = item.get("role")
                if role not in ROLES:
                    raise APIError(400, f"{at}.role must be one of {list(ROLES)}; got {_shown(role)}", f"{at}.role")
                content = item.get("content")
                message = {"role": role, "content": content if isinstance(content, str) or content is None
                           else self._parts(f"{at}.content", content)}  # fmt: skip
                if reasoning is not None and role == "assistant":
                    message["reasoning_content"], reasoning = reasoning, None
                messages.append(message)
                origins.append(at)
            elif kind == "function_call":
                call = {"id": self._text(item, "call_id", at), "type": "function",
                        "function": {"name": self._text(item, "name", at), "arguments": self._text(item, "arguments", at)}}
                if messages and messages[-1]["role"] == "assistant" and origins[-1] != "instructions":
                    messages[-1].setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                    origins.append(at)
            elif kind == "function_call_output":
                output = item.get("output")
                content = output if isinstance(output, str) else self._parts(f"{at}.output", output)
                messages.append({"role": "tool", "tool_call_id": self._text(item, "call_id", at), "content": content})
                origins.append(at)
            elif kind == "reasoning":  # the model's earlier reasoning: handed to its next answer's template
                reasoning = "".join(p.get("text", "") for p in item.get("content") or [] if isinstance(p, dict))
            else:
                raise APIError(400, f"{at}.type: this server takes messages, 'function_call', 'function_call_output' "
                                    f"and 'reasoning' items; got {_shown(kind)}", f"{at}.type")  # fmt: skip

    @staticmethod
    def _text(item: dict[str, Any], key: str, at: str) -> str:
        value = item.get(key)
        if not isinstance(value, str):
            raise APIError(400, f"{at}.{key} must be a string; got {_shown(value)}", f"{at}.{key}")
        return value

    @staticmethod
    def _parts(at: str, parts: Any) -> list[dict[str, Any]]:
        """Content parts as the chat request takes them (``input_text`` and ``output_text`` -> text parts)."""
        if not isinstance(parts, list):
            raise APIError(400, f"{at} must be a string or a list of content parts; got {_shown(parts)}", at)
        out = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _PARTS:
                raise APIError(400, f"{at}.{j}.type: this server reads text only, parts of type {sorted(_PARTS)}; got "
                                    f"{_shown(kind if kind is not None else part)}", f"{at}.{j}.type")  # fmt: skip
            key = "refusal" if kind == "refusal" else "text"
            if not isinstance(part.get(key), str):
                raise APIError(400, f"{at}.{j}.{key} must be a string; got {_shown(part.get(key))}", f"{at}.{j}.{key}")
            out.append({"type": _PARTS[kind], key: part[key]})
        return out

    @staticmethod
    def _tool(i: int, tool: dict[str, Any]) -> dict[str, Any]:
        if tool.get("type") != "function":
            raise APIError(400, f"tools.{i}.type: this server runs function tools only ({{'type': 'function', 'name': "
                                f"..., 'parameters': {{...}}}}); got {_shown(tool.get('type'))}", f"tools.{i}.type")
        extra = sorted(set(tool) - {"type", "name", "description", "parameters", "strict"})
        if extra or not isinstance(tool.get("name"), str):
            raise APIError(400, f"tools.{i} is {{'type': 'function', 'name': <a string>, 'description', 'parameters', "
                                f"'strict'}}; got {_shown(tool)}", f"tools.{i}")  # fmt: skip
        return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type" and v is not None}}

    def _tool_choice(self) -> Any:
        choice = self.tool_choice
        if not isinstance(choice, dict):
            return choice
        if choice.get("type") != "function" or set(choice) != {"type", "name"} or not isinstance(choice["name"], str):
            raise APIError(400, f"a named tool_choice is {{'type': 'function', 'name': <a tool's name>}}; got "
                                f"{_shown(choice)}", "tool_choice")  # fmt: skip
        return {"type": "function", "function": {"name": choice["name"]}}

    def text_format(self) -> dict[str, Any] | None:
        """``text.format`` as the chat request's ``response_format`` (``None`` for free text)."""
        text = self.text or {}
        extra = sorted(set(text) - {"format", "verbosity"})
        if extra:
            raise APIError(400, f"text takes 'format' and 'verbosity'; got {extra}", "text")
        fmt = text.get("format")
        if fmt is None or fmt == {"type": "text"}:
            return None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            spec = {k: v for k, v in fmt.items() if k != "type"}
            return {"type": "json_schema", "json_schema": spec}
        if fmt == {"type": "json_object"}:
            return fmt
        raise APIError(400, f"text.format must be {{'type': 'text'}}, {{'type': 'json_object'}} or {{'type': "
                            f"'json_schema', 'name': ..., 'schema': {{...}}}}; got {_shown(fmt)}", "text.format")

    def renamed(self, err: APIError, origins: list[str]) -> APIError:
        """``err`` (found in the chat request) naming the Responses fields: ``messages.2`` as the item it came from
        (``origins``), ``max_completion_tokens`` as ``max_output_tokens``, ``response_format`` as ``text.format``."""

        def rename(text: str) -> str:
            text = re.sub(r"\bmessages\.(\d+)", lambda m: origins[int(m.group(1))] if int(m.group(1)) < len(origins)
                          else m.group(0), text)  # fmt: skip
            for chat, ours in _RENAMED.items():
                text = re.sub(rf"\b{re.escape(chat)}\b", ours, text)
            return text

        param = None if err.param is None else rename(err.param)
        return APIError(err.status, rename(err.message), param, err.code)


__all__ = ["EXTENSIONS", "LOGPROBS", "ResponsesRequest"]
