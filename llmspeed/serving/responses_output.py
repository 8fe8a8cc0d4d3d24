"""The OpenAI Responses API's answers, written from the chat completions answer the server computed for a
:class:`~.responses_request.ResponsesRequest`: a whole ``response`` object (:func:`whole`) or its server-sent events
(:class:`ResponseEvents`, fed the chat stream's chunks one by one).

The answer's ``output`` is a list of items: a ``reasoning`` item (where the tool-call format reads reasoning out of
the text), a ``message`` holding one ``output_text`` part (left out when the answer is only tool calls), then one
``function_call`` item per tool call. An answer cut by ``max_output_tokens`` is ``status: "incomplete"`` with
``incomplete_details.reason: "max_output_tokens"``, its stream ending in ``response.incomplete``; a request that
fails after its stream began ends with an ``error`` event and ``response.failed``, as OpenAI's API streams them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi.sse import format_sse_event

from .responses_request import ResponsesRequest


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(chat_usage: dict[str, Any], cached: int) -> dict[str, Any]:
    """The Responses ``usage`` of a chat answer's, with ``cached`` prompt tokens served from the prefix cache."""
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}  # fmt: skip


def message_item(item_id: str, text: str, logprobs: list[dict[str, Any]], status: str) -> dict[str, Any]:
    """An assistant ``message`` item with one ``output_text`` part."""
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    """A ``function_call`` item (``call_id`` is what the tool's ``function_call_output`` names)."""
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A ``reasoning`` item holding the reasoning text the answer's format marks."""
    return {"id": item_id, "type": "reasoning", "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def response_object(req: ResponsesRequest, rid: str, created: float, status: str, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """A ``response`` object: ``status`` (``in_progress``, ``completed``, ``incomplete``, ``failed``), its ``output``
    items, and the request's settings as OpenAI's API echoes them."""
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "background": False, "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls, "model": req.model, "output": output,
        "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "store": req.stored, "temperature": req.temperature,
        "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": req.tools or [],
        "top_logprobs": req.top_logprobs or 0, "top_p": req.top_p, "truncation": "disabled", "usage": usage,
        "user": req.user, "metadata": req.metadata or {},
    }


def whole(req: ResponsesRequest, answer: dict[str, Any], cached: int) -> dict[str, Any]:
    """The ``response`` object of a whole ``chat.completion`` answer (one choice)."""
    choice = answer["choices"][0]
    msg = choice["message"]
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    items = []
    if msg.get("reasoning_content"):
        items.append(reasoning_item(_id("rs"), msg["reasoning_content"], status))
    calls = msg.get("tool_calls") or []
    if msg.get("content") or not calls:
        logprobs = (choice.get("logprobs") or {}).get("content") or []
        items.append(message_item(_id("msg"), msg.get("content") or "", logprobs, status))
    items += [call_item(_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"], status) for c in calls]
    response = response_object(req, _id("resp"), answer["created"], status, items, usage(answer["usage"], cached))
    req.kept(response)  # stored, when the server keeps responses and the request did not say store: false
    return response


class ResponseEvents:
    """The Responses event stream of one streamed chat answer: :meth:`opening` first, then :meth:`chunk` for each
    chat chunk (a dict, an error body, or ``"[DONE]"``); :meth:`frames` writes events as server-sent events.

    Every event carries its ``sequence_number``; items open (``response.output_item.added``), grow (text, reasoning
    and argument deltas) and close (``*.done``, ``response.output_item.done``) one at a time, in ``output`` order.
    """

    def __init__(self, req: ResponsesRequest):
        self.req = req
        self.rid, self.created = _id("resp"), time.time()
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # every item opened, as it is now
        self.current: dict[str, Any] | None = None  # the item being written
        self.status = "completed"

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _response(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_object(self.req, self.rid, self.created, status, [dict(i) for i in self.items], **extra)

    def opening(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress``."""
        return [self._event("response.created", response=self._response("in_progress")),
                self._event("response.in_progress", response=self._response("in_progress"))]

    def _open(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.items.append(item)
        self.current = item
        at = {"output_index": len(self.items) - 1}
        events.append(self._event("response.output_item.added", **at, item=json.loads(json.dumps(item))))
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self._event("response.content_part.added", item_id=item["id"], **at, content_index=0, part=part))
        return events

    def _close(self) -> list[dict[str, Any]]:
        item, self.current = self.current, None
        if item is None:
            return []
        item["status"] = self.status
        at = {"item_id": item["id"], "output_index": self.items.index(item)}
        if item["type"] == "message":
            part = item["content"][0]
            events = [self._event("response.output_text.done", **at, content_index=0, text=part["text"],
                                  logprobs=part["logprobs"]),
                      self._event("response.content_part.done", **at, content_index=0, part=part)]  # fmt: skip
        elif item["type"] == "function_call":
            events = [self._event("response.function_call_arguments.done", **at, name=item["name"],
                                  arguments=item["arguments"])]  # fmt: skip
        else:
            events = [self._event("response.reasoning_text.done", **at, content_index=0,
                                  text=item["content"][0]["text"])]  # fmt: skip
        del at["item_id"]
        return [*events, self._event("response.output_item.done", **at, item=json.loads(json.dumps(item)))]

    def _text(self, kind: str, text: str, logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events = []
        if self.current is None or self.current["type"] != kind:
            events += self._open(message_item(_id("msg"), "", [], "in_progress") if kind == "message"
                                 else reasoning_item(_id("rs"), "", "in_progress"))  # fmt: skip
        item = self.current
        assert item is not None
        part = item["content"][0]
        part["text"] += text
        at = {"item_id": item["id"], "output_index": len(self.items) - 1, "content_index": 0}
        if kind == "message":
            part["logprobs"] += logprobs
            return [*events, self._event("response.output_text.delta", **at, delta=text, logprobs=logprobs)]
        return [*events, self._event("response.reasoning_text.delta", **at, delta=text)]

    def _call(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        function = delta.get("function") or {}
        if "id" in delta:  # a new call
            events += self._open(call_item(_id("fc"), delta["id"], function.get("name", ""), "", "in_progress"))
        item = self.current
        piece = function.get("arguments") or ""
        if item is None or item["type"] != "function_call" or not piece:
            return events
        item["arguments"] += piece
        return [*events, self._event("response.function_call_arguments.delta", item_id=item["id"],
                                     output_index=len(self.items) - 1, delta=piece)]  # fmt: skip

    def chunk(self, payload: Any, cached: int = 0) -> list[dict[str, Any]]:
        """The events of one chat stream payload; ``cached``: prompt tokens from the prefix cache (for the usage)."""
        if not isinstance(payload, dict):  # "[DONE]": the final event went out with the usage chunk
            return []
        if "error" in payload:  # the request failed after its stream began
            error = payload["error"]
            return [self._event("error", code=error.get("code") or error.get("type"), message=error["message"],
                                param=error.get("param")),
                    self._event("response.failed", response=self._response(
                        "failed", error={"code": "server_error", "message": error["message"]}))]  # fmt: skip
        events: list[dict[str, Any]] = []
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") or {}
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            if delta.get("reasoning_content"):
                events += self._text("reasoning", delta["reasoning_content"], [])
            if delta.get("content"):
                events += self._text("message", delta["content"], logprobs)
            elif logprobs and self.current is not None and self.current["type"] == "message":
                self.current["content"][0]["logprobs"] += logprobs  # tokens whose text is still held back
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            if choice.get("finish_reason") is not None:
                self.status = "incomplete" if choice["finish_reason"] == "length" else "completed"
                if not self.items:  # nothing was written: an empty message, as a whole answer has
                    events += self._open(message_item(_id("msg"), "", [], "in_progress"))
                events += self._close()
        if payload.get("usage") is not None:
            kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
            response = self._response(self.status, usage=usage(payload["usage"], cached))
            self.req.kept(response)  # stored, as a whole answer's is
            events.append(self._event(kind, response=response))
        return events

    @staticmethod
    def frames(events: list[dict[str, Any]]) -> list[bytes]:
        """``events`` as server-sent events, each named by its type (``event: response.output_text.delta``)."""
        return [format_sse_event(event=e["type"], data_str=json.dumps(e)) for e in events]


__all__ = ["ResponseEvents", "call_item", "message_item", "reasoning_item", "response_object", "usage", "whole"]
