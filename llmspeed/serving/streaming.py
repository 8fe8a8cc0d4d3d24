"""Streamed answers of the OpenAI-compatible server: :func:`stream` writes a request's choices as server-sent events
as their tokens arrive (chat and completion chunks, or the Responses API's events), :func:`unless_gone` waits for work
unless the client leaves first, and :func:`failure` says why an output is no answer (the HTTP error it becomes)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from fastapi.sse import format_sse_event
from starlette.background import BackgroundTask

from ..generation import GenerationOutput, StreamEvent
from ..generation.engine import STEP_FAILED
from .api_errors import APIError
from .engine import ENGINE_DIED
from .handle import RequestHandle, interleave
from .openai_responses import (
    chat_logprobs,
    completion_logprobs,
    echoed_logprobs,
    finish_reason,
    new_id,
    usage,
)
from .responses_output import ResponseEvents
from .responses_request import ResponsesRequest
from .tool_choice import ToolDeltas
from .tool_parser import ToolCallStream, merge
from .tool_parser import finish_reason as tool_finish_reason

CLIENT_GONE = 499  # the status of an answer nobody receives (nginx's "client closed request")


def sse(payload: Any) -> bytes:
    """One server-sent event holding ``payload`` (a string as it is, anything else as JSON)."""
    return format_sse_event(data_str=payload if isinstance(payload, str) else json.dumps(payload))


def failure(output: GenerationOutput, prompt_param: str | None = None) -> APIError | None:
    """Why ``output`` is not an answer (``None`` when it is one); a request refused before any token (its
    prompt too long, bad ids, a template that cannot render it) names ``prompt_param`` (``prompt``, ``messages``)."""
    if output.finish_reason == "error":
        # an error before any token is the request's fault (too long, bad ids), unless a step raised (a fault
        # in the model or the sampler, out of memory); later, the server's
        message = output.error or "generation failed"
        refused = not output.token_ids and not message.startswith((STEP_FAILED, ENGINE_DIED))
        return APIError(400, message, prompt_param) if refused else APIError(500, message)
    if output.finish_reason == "abort":  # the client is gone, or the engine was closed under it
        return APIError(503, "the request was aborted before it finished: the server is shutting down")
    return None


async def unless_gone(request: Request, work: Any) -> tuple[bool, Any]:
    """Await ``work`` unless the client disconnects first: ``(True, result)``, or ``(False, None)``.

    The disconnect is awaited on ``request.receive()`` itself: ``request.is_disconnected()`` peeks with a
    cancelled scope, which through an ``@app.middleware`` wrapper never sees it.
    """

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return True, task.result()
        return False, None
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()


async def stream(request: Request, req: Any, handles: list[RequestHandle], chat: bool, tokenizer: Any,
                 template: dict[str, Any] | None, responses: ResponsesRequest | None = None,
                 prompt_params: list[str] | None = None, echo: list[tuple[str, list[int]]] | None = None,
                 generated: bool = True) -> Response:
    """Stream the choices of ``handles`` as they arrive, each chunk naming its choice by ``index`` (or, for a
    ``responses`` request, as the Responses API's events: :class:`.responses_output.ResponseEvents`).

    Each choice ends with its own ``finish_reason`` chunk; a choice that fails ends the whole stream with
    an error event and aborts the others, and so does a client that disconnects. ``tokenizer`` writes
    log-probabilities' tokens; ``template``: the response template when the request reads tool calls out of its
    answer (``tool_choice: "auto"``, :mod:`.tool_parser`), else ``None``;
    ``prompt_params[i]`` names handle ``i``'s prompt when it is refused before any token (a 400, not a stream).
    ``echo`` (``echo: true``): per prompt, its text and token ids; a completion choice's first chunk starts with the
    text (and, with ``logprobs``, the prompt tokens' entries, the first ``null``), a chat answer's content with the
    message it continues; ``generated=False`` (``max_tokens: 0``): the prompt alone, its one computed token dropped.
    """
    events = interleave(handles)

    def abort_all() -> None:
        for h in handles:
            h.abort()

    try:  # a request may wait long for its first token (queued behind others): the client may leave first
        here, first = await unless_gone(request, anext(events))
    except BaseException:
        abort_all()
        raise
    if not here:
        abort_all()
        return Response(status_code=CLIENT_GONE)
    # the handles were admitted in one turn (Engine._submit_all): by the first event, any refused one has ended
    ended = [(i, h.result(timeout=0)) for i, h in enumerate(handles) if h.done()]
    refused = next((err for i, out in ended if not out.token_ids and (err := failure(
        out, prompt_params[i] if prompt_params else "messages" if chat else "prompt")) is not None), None)
    if refused is not None:  # before any token: a plain 4xx, not a stream
        abort_all()
        await events.aclose()
        raise refused
    rid = new_id("chatcmpl" if chat else "cmpl")
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": req.model}
    if req.include_usage:  # as OpenAI's: every chunk carries "usage": null, the last one the counts
        head["usage"] = None
    n = len(handles) // len(echo) if echo else 1  # completions: choice i answers prompt i // n
    # per choice: the text_offset of its next token's legacy logprobs (past an echoed prompt), and whether its first
    # chunk went out (the one an echoed prompt leads)
    offsets = [len(echo[i // n][0]) if echo else 0 for i in range(len(handles))]
    started = [False] * len(handles)
    calls = [ToolDeltas(req.tool_choice) for _ in handles] if chat and req.forces_tools else None
    parsers = [ToolCallStream(template, req.tool_specs(), req.max_tool_calls) for _ in handles] \
        if template is not None else None  # fmt: skip

    def chunk(i: int, event: StreamEvent) -> dict[str, Any] | None:
        done = finish_reason(event.output) if event.finished and event.output is not None else None
        delta = {"content": event.text} if event.text else {}
        if calls is not None:  # forced tool calls: the text goes out as their arguments
            delta, done = calls[i].delta(event.text, done)
        elif parsers is not None:  # tool_choice "auto": content as it comes, each call once it closes
            delta = parsers[i].feed(event.text) if event.text else {}
            if event.finished:
                delta = merge(delta, parsers[i].finish())
                done = tool_finish_reason(parsers[i], done)
        if not delta and done is None and event.logprobs is None:
            return None
        if chat:
            choice = {"index": i, "delta": delta, "finish_reason": done,
                      "logprobs": chat_logprobs(tokenizer, [event.logprobs]) if event.logprobs else None}
        else:
            text = event.text if generated else ""
            lps = completion_logprobs(tokenizer, [event.logprobs] if generated else [], offsets[i]) \
                if event.logprobs else None  # fmt: skip
            if lps is not None and lps["tokens"]:
                offsets[i] += len(lps["tokens"][0])
            if echo and not started[i]:  # the prompt before the choice's first text
                prompt, ids = echo[i // n]
                entries = event.prompt_logprobs or (event.output.prompt_logprobs if event.output is not None else None)
                text, lps = prompt + text, echoed_logprobs(tokenizer, ids, entries, lps, 0, req.logprobs)
            done = done if generated or done is None else "length"
            choice = {"index": i, "text": text, "finish_reason": done, "logprobs": lps}
            if not (text or lps or done):
                return None
        if done is not None and event.output is not None:  # vLLM's: the stop string or token id that ended it
            choice["stop_reason"] = event.output.stop_reason if generated else None
        started[i] = True
        return {**head, "choices": [choice]}

    outputs: list[Any] = [None] * len(handles)
    shaped = ResponseEvents(responses) if responses is not None else None

    def out(payload: Any) -> list[bytes]:
        if shaped is None:
            return [sse(payload)]
        return shaped.frames(shaped.chunk(payload, outputs[0].metrics.cached_tokens if outputs[0] else 0))

    async def body() -> AsyncIterator[bytes]:
        failed = None
        try:
            if shaped is not None:
                for frame in shaped.frames(shaped.opening()):
                    yield frame
            elif chat:
                for i in range(len(handles)):
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "finish_reason": None, "logprobs": None}]})
                    if echo and echo[0][0]:  # the assistant message the answer continues, as vLLM sends it
                        yield sse({**head, "choices": [{"index": i, "delta": {"content": echo[0][0]},
                                                         "finish_reason": None, "logprobs": None}]})
            arrived: tuple[int, StreamEvent] | None = first
            while arrived is not None:
                i, event = arrived
                if event.finished and event.output is not None:
                    failed = failure(event.output)
                    if failed is not None:  # the openai client raises APIError on an error event
                        for frame in out(failed.body()):
                            yield frame
                        break
                    outputs[i] = event.output
                piece = chunk(i, event)
                for frame in out(piece) if piece is not None else []:
                    yield frame
                arrived = await anext(events, None)
            if failed is None and req.include_usage and None not in outputs:
                for frame in out({**head, "choices": [], "usage": usage(outputs, req.n, generated)}):
                    yield frame
            if shaped is None:  # the Responses API's stream ends with its last event
                yield sse("[DONE]")
        finally:
            abort_all()  # a no-op for choices that finished; a failed sibling or a disconnect lands here
            await events.aclose()

    # a client gone before the body's first chunk leaves body() unstarted, so its finally never runs: the
    # response's background task, which runs after the stream ends or the client disconnects, aborts them too
    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(abort_all))


__all__ = ["CLIENT_GONE", "failure", "sse", "stream", "unless_gone"]
