"""``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``, as vLLM's OpenAI-compatible server has them.

``/tokenize`` answers the token ids a request would run: a ``prompt`` as ``/v1/completions`` tokenizes it, chat
``messages`` as ``/v1/chat/completions`` renders and tokenizes them (the same functions), so a client can count a
prompt's tokens against ``max_model_len`` before it sends it. ``/detokenize`` turns token ids back into text.
``/tokenizer_info`` gives the special tokens and the chat template. Together they are the "remote tokenizer" that
evaluation harnesses (lm-evaluation-harness's ``local-completions``) use instead of downloading the model's.
They sit outside ``/v1``, as vLLM's do; unlike vLLM's, a server's API key guards them as it guards ``/v1`` (they
render chat templates for whoever calls).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from ..generation.prompts import prompt_ids
from .api_errors import APIError
from .chat_prompt import chat_prompt_off_loop
from .chat_request import ChatCompletionRequest
from .openai_protocol import parse

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
    add_special_tokens: bool | None = None  # a text prompt's BOS/EOS as the tokenizer adds them (True: as completions)
    # with messages, the chat endpoint's template extensions (vLLM's /tokenize takes them too)
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


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
    if req.add_special_tokens is not None and not isinstance(req.prompt, str):
        raise APIError(400, "add_special_tokens applies to a text prompt (a chat template writes its own special tokens; "
                            "token ids are taken as they are)", "add_special_tokens")  # fmt: skip
    gen = server.engine.generator
    options = {k: getattr(req, k) for k in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs")
               if getattr(req, k) is not None}  # fmt: skip
    if options and req.messages is None:
        raise APIError(400, f"{next(iter(options))} goes with messages (a chat template option)", next(iter(options)))
    if req.messages is not None:  # the chat endpoint's own checks and rendering
        tools = {"tools": req.tools, "tool_choice": "none"} if req.tools is not None else {}  # shown, never called
        chat = parse(ChatCompletionRequest, {"model": server.model_name, "messages": req.messages, **tools, **options})
        prompt = await chat_prompt_off_loop(server.tokenizer, chat.chat(), chat.tool_specs(), chat.template_options())
        param = "messages"
    else:
        prompt, param = req.prompt, "prompt"
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    try:
        if req.add_special_tokens is False and isinstance(prompt, str):  # the text's own tokens (a harness adds
            ids = await asyncio.to_thread(_plain_ids, gen.tokenizer, prompt)  # its own BOS where it wants one)
        else:
            ids = await asyncio.to_thread(prompt_ids, prompt, gen.tokenizer, gen.chat_template, gen.model.spec.vocab_size)
    except ValueError as err:
        raise APIError(400, str(err), param) from None
    strs = None
    if req.return_token_strs:
        convert = getattr(server.tokenizer, "convert_ids_to_tokens", None)
        strs = list(convert(ids)) if convert is not None else [server.tokenizer.decode([t]) for t in ids]
    return {"count": len(ids), "max_model_len": gen.scheduler.max_tokens_per_seq, "tokens": ids, "token_strs": strs}


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    """``text``'s token ids without the special tokens the tokenizer adds around a sequence."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass prompts as lists of token ids")
    try:
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    except Exception as exc:  # a tokenizer without the option, or text it cannot encode
        raise ValueError(f"the tokenizer cannot encode this prompt without special tokens ({type(exc).__name__}: "
                         f"{exc})") from exc  # fmt: skip


def tokenizer_info(server: OpenAIServer) -> dict[str, Any]:
    """``GET /tokenizer_info`` (vLLM's): the tokenizer's class, special tokens (``None`` where it has none), chat
    template, vocabulary size, and ``max_model_len``, the most tokens a request holds here."""
    tok = server.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer: prompts are token ids")

    def special(name: str) -> str | None:
        value = getattr(tok, name, None)
        return None if value is None else str(value)

    return {"tokenizer_class": type(tok).__name__, **{n: special(n) for n in ("bos_token", "eos_token", "pad_token",
            "unk_token")}, "chat_template": getattr(tok, "chat_template", None), "vocab_size": len(tok),
            "max_model_len": server.engine.generator.scheduler.max_tokens_per_seq}  # fmt: skip


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


__all__ = ["DetokenizeRequest", "TokenizeRequest", "detokenize", "tokenize", "tokenizer_info"]
