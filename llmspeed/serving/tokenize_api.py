"""``POST /tokenize`` and ``POST /detokenize``, as vLLM's OpenAI-compatible server has them.

``/tokenize`` answers the token ids a request would run: a ``prompt`` as ``/v1/completions`` tokenizes it, chat
``messages`` as ``/v1/chat/completions`` renders and tokenizes them (the same functions), so a client can count a
prompt's tokens against ``max_model_len`` before it sends it. ``/detokenize`` turns token ids back into text.
Both sit outside ``/v1``, as vLLM's do; unlike vLLM's, a server's API key guards them as it guards ``/v1`` (they
render chat templates for whoever calls).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from ..generation.prompts import prompt_ids
from .api_errors import APIError
from .chat_prompt import chat_prompt_off_loop
from .openai_protocol import ChatCompletionRequest, parse

if TYPE_CHECKING:
    from .server import OpenAIServer


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: a ``prompt`` (text or token ids) or chat ``messages`` (with optional ``tools``), not both."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: token ids to decode."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


async def tokenize(server: OpenAIServer, payload: Any) -> dict[str, Any]:
    """The token ids of the request's prompt or messages, exactly as the completion endpoints would run them:
    ``{"count", "max_model_len", "tokens", "token_strs"}`` (the tokens' strings with ``return_token_strs``)."""
    req = parse(TokenizeRequest, payload)
    if req.model is not None:
        server.adapter_for(req.model)  # 404 for a model this server does not have
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt (text or token ids) or messages (a chat), not both and not neither",
                       "prompt" if req.prompt is not None else "messages")
    if req.tools is not None and req.messages is None:
        raise APIError(400, "tools go with messages (they are rendered by the chat template)", "tools")
    gen = server.engine.generator
    if req.messages is not None:  # the chat endpoint's own checks and rendering
        tools = {"tools": req.tools, "tool_choice": "none"} if req.tools is not None else {}  # shown, never called
        chat = parse(ChatCompletionRequest, {"model": server.model_name, "messages": req.messages, **tools})
        prompt, param = await chat_prompt_off_loop(server.tokenizer, chat.chat(), chat.tool_specs()), "messages"
    else:
        prompt, param = req.prompt, "prompt"
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    try:
        ids = await asyncio.to_thread(prompt_ids, prompt, gen.tokenizer, gen.chat_template, gen.model.spec.vocab_size)
    except ValueError as err:
        raise APIError(400, str(err), param) from None
    strs = None
    if req.return_token_strs:
        convert = getattr(server.tokenizer, "convert_ids_to_tokens", None)
        strs = list(convert(ids)) if convert is not None else [server.tokenizer.decode([t]) for t in ids]
    return {"count": len(ids), "max_model_len": gen.scheduler.max_tokens_per_seq, "tokens": ids, "token_strs": strs}


async def detokenize(server: OpenAIServer, payload: Any) -> dict[str, Any]:
    """``{"prompt": text}``: the tokenizer's decoding of ``tokens`` (special tokens kept, as vLLM's)."""
    req = parse(DetokenizeRequest, payload)
    if req.model is not None:
        server.adapter_for(req.model)
    vocab = server.engine.generator.model.spec.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens must be token ids in [0, {vocab}); got {bad}", "tokens")
    if server.tokenizer is None:
        raise APIError(400, "this model has no tokenizer to decode with", "tokens")
    return {"prompt": await asyncio.to_thread(server.tokenizer.decode, req.tokens)}


__all__ = ["DetokenizeRequest", "TokenizeRequest", "detokenize", "tokenize"]
