"""An OpenAI-compatible HTTP server over the :class:`~.engine.Engine` (FastAPI + uvicorn).

Endpoints: ``GET /v1/models`` and ``/v1/models/{model}``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(both stream as server-sent events ending in ``data: [DONE]``; the chunks of ``n > 1`` choices interleave, each
naming its choice by ``index``), ``POST /v1/responses`` (OpenAI's Responses API, answered as the chat request it
asks for), ``GET /health`` (and ``HEAD``), ``GET /metrics`` (Prometheus text).
The request's ``model`` picks the base model or one of the served LoRA adapters; requests for
different adapters share one batch. A client that disconnects aborts its request (every choice of it); a
choice that fails fails the request and aborts its sibling choices. Every bad request
is answered 4xx with an OpenAI-style error body; nothing a client sends stops the server. A request that
fails (or is aborted by shutdown) after its stream began ends with a ``data: {"error": ...}`` event, which
the ``openai`` client raises as ``APIError``; never with a normal ``finish_reason``.

:class:`OpenAIServer` holds what each endpoint answers; :mod:`.streaming` writes streamed answers; :mod:`.http_app`
wires its routes, API-key check and error bodies into the FastAPI application.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..generation import GenerationOutput, SamplingParams
from ..generation.prompts import prompt_ids
from ..lora import adapter_names
from . import tokenize_api
from .api_errors import APIError
from .chat_prompt import chat_prompt_off_loop
from .chat_request import ChatCompletionRequest
from .engine import Engine
from .handle import RequestHandle, interleave
from .http_app import build_app
from .openai_protocol import CompletionRequest, parse
from .openai_responses import chat_response, completion_response, new_id
from .responses_output import whole
from .responses_request import ResponsesRequest
from .responses_store import ResponseStore
from .sampling_defaults import sampling_defaults
from .streaming import CLIENT_GONE, stream, unless_gone
from .streaming import failure as answer_failure
from .tool_choice import with_tool_calls
from .tool_parser import response_template, with_parsed_calls


class OpenAIServer:
    """The endpoints' logic over one engine; :meth:`app` builds the FastAPI application.

    Args:
        engine: The engine that runs every request.
        model_name: The name clients use for the base model. With ``adapters`` served, its requests run the base
            alone, whatever adapter is active (as vLLM: ``SamplingParams(adapter=False)``); without, they run the
            model as it is set, its active adapter included (``lora.add_adapter`` activates the one it adds).
        adapters: LoRA adapter names loaded on the model, each also a model name.
        api_key: When given, every request to the API (``/v1/...``) must carry ``Authorization: Bearer <api_key>``;
            ``/health`` and ``/metrics`` stay open, as vLLM's, for load balancers and metric scrapers.
        tool_call_parser: How ``tool_choice: "auto"`` (the default with ``tools``) reads tool calls out of an answer
            (:mod:`.tool_parser`): ``"hermes"``, a response template, or ``None`` for the tokenizer's own
            ``response_template`` (else Hermes for Qwen 2 and 3 models); with none, such requests are a 400.
        allow_runtime_lora: Serve vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
            (:mod:`.lora_api`): clients load adapter folders from the server's disk, and unload them, while it serves.
        responses_store: Keep Responses API answers (:mod:`.responses_store`) for ``previous_response_id`` and
            ``GET`` / ``DELETE /v1/responses/{id}``; without it those are refused.
        generation_config: Where the sampling defaults of a request that leaves them out come from
            (:func:`.sampling_defaults.sampling_defaults`): ``"auto"`` (default, as vLLM) the model's generation
            config, ``"vllm"`` the OpenAI API's defaults, or a folder holding a ``generation_config.json``.

    Raises:
        ValueError: An adapter is named as the base model, or twice (one name must pick one model), or is not loaded
            on the engine's model (every request for it would fail); a ``tool_call_parser`` that is not one.
    """

    def __init__(self, engine: Engine, model_name: str, adapters: Sequence[str] = (), api_key: str | None = None,
                 tool_call_parser: str | dict[str, Any] | None = None, allow_runtime_lora: bool = False,
                 responses_store: bool = False, generation_config: str = "auto"):  # fmt: skip
        self.engine = engine
        self.model_name = model_name
        self.adapters = tuple(adapters)
        if model_name in self.adapters:
            raise ValueError(f"adapter {model_name!r} is named as the base model: a request for it could not reach it")
        if len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"adapter names must be unique; got {list(self.adapters)}")
        loaded = adapter_names(engine.model)
        missing = [name for name in self.adapters if name not in loaded]
        if missing:
            raise ValueError(
                f"adapters must be loaded on the engine's model; got {missing}, which it does not carry (it has "
                f"{loaded or 'none'}): load them first (lora.load_adapter)"
            )
        self.api_key = api_key
        self.allow_runtime_lora = allow_runtime_lora
        self.adapter_updates = asyncio.Lock()  # one adapter load or unload at a time (lora_api)
        self.responses_store = ResponseStore() if responses_store else None
        self.tokenizer = engine.model.tokenizer
        model_type = getattr(getattr(engine.model.module, "config", None), "model_type", None)
        self.response_template = response_template(self.tokenizer, tool_call_parser, model_type)
        self.context = engine.generator.scheduler.max_seq_len  # the model's context, or --max-model-len
        self.sampling_defaults = sampling_defaults(engine.model, generation_config)
        self.created = int(time.time())

    # --- helpers --------------------------------------------------------------------------------
    def _template(self) -> dict[str, Any]:
        """The response template of ``tool_choice: "auto"`` (checked present before a request is submitted)."""
        if self.response_template is None:
            raise AssertionError("a request that parses tool calls reached a server without a response template")
        return self.response_template

    def adapter_for(self, model: str) -> str | Literal[False] | None:
        """What a request naming ``model`` runs with (``SamplingParams.adapter``); a 404 for a model not served."""
        if model == self.model_name:  # beside served adapters: the base alone, not whichever one is active
            return False if self.adapters else None
        if model in self.adapters:
            return model
        known = [self.model_name, *self.adapters]
        raise APIError(404, f"model {model!r} does not exist; this server has {known}", "model", "model_not_found")

    def _check(self, output: GenerationOutput, prompt_param: str | None = None) -> None:
        failure = answer_failure(output, prompt_param)
        if failure is not None:
            raise failure

    async def _results(self, request: Request, handles: list[RequestHandle],
                       prompt_params: list[str] | None = None) -> list[GenerationOutput] | None:
        """Wait for every handle; return ``None`` if the client goes away first. The first choice that fails
        raises its :class:`APIError` at once (a refused prompt naming ``prompt_params[i]``); either way every handle
        still running is aborted."""

        async def finals() -> list[GenerationOutput]:
            outputs: list[Any] = [None] * len(handles)
            async with aclosing(interleave(handles)) as events:
                async for i, event in events:
                    if event.finished and event.output is not None:
                        # a failed choice fails the answer: no partial 200
                        self._check(event.output, prompt_params[i] if prompt_params else None)
                        outputs[i] = event.output
            return outputs

        try:
            _, outputs = await unless_gone(request, finals())
            return outputs
        finally:
            for h in handles:
                h.abort()

    def _submit_all(self, requests: list[tuple[Any, SamplingParams]], priority: int = 0) -> list[RequestHandle]:
        """Submit one request per (prompt, choice), all admitted in the same turn of the engine (a prompt it refuses
        has ended before any choice has a token: :func:`.streaming.stream` then answers a 400); 503 when closed, 400
        for a ``priority`` the engine's scheduling policy does not take."""
        try:
            return self.engine._submit_all(requests, asyncio.get_running_loop(), priority)
        except RuntimeError as err:  # closed engine: none was queued
            raise APIError(503, str(err)) from None
        except ValueError as err:  # a priority under the "fcfs" policy: none was queued
            raise APIError(400, f"{err}: start the server with --scheduling-policy priority", "priority") from None

    # --- endpoints ------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the base model and each adapter."""
        return {"object": "list", "data": [self.model(name) for name in (self.model_name, *self.adapters)]}

    def model(self, name: str) -> dict[str, Any]:
        """``GET /v1/models/{name}``: one model (404 ``model_not_found`` for a name this server does not have), with
        vLLM's ``max_model_len`` (the most tokens a request holds here), which clients size their prompts by."""
        self.adapter_for(name)
        parent = None if name == self.model_name else self.model_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "llmspeed", "root": name,
                "parent": parent, "max_model_len": self.engine.generator.scheduler.max_tokens_per_seq}

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text exposition of :meth:`Engine.metrics` and of the finished requests'
        statistics (:class:`.request_stats.RequestStats`)."""
        m = self.engine.metrics()
        lines = []
        for name, kind, help_, value in [
            ("requests_running", "gauge", "Requests in the running batch", m["requests_running"]),
            ("requests_waiting", "gauge", "Requests waiting for admission", m["requests_waiting"]),
            ("kv_blocks_used", "gauge", "KV-cache blocks held by requests", m["kv_blocks_used"]),
            ("kv_blocks_free", "gauge", "KV-cache blocks free or evictable", m["kv_blocks_free"]),
            ("prefix_cache_hit_rate", "gauge", "Share of tokens looked up at admission (prompts; a preempted request's tokens again) served from the prefix cache", m["prefix_cache_hit_rate"]),
            ("generation_tokens_total", "counter", "Tokens generated", m["tokens_generated"]),
            ("requests_finished_total", "counter", "Requests that ended", m["requests_finished"]),
        ]:
            lines += [f"# HELP llmspeed_{name} {help_}", f"# TYPE llmspeed_{name} {kind}", f"llmspeed_{name} {value}"]
        lines += self.engine.stats.lines()  # prompt tokens, how requests ended, TTFT / per-token / latency histograms
        return "\n".join(lines) + "\n"

    async def tokenize(self, payload: Any) -> dict[str, Any]:
        """``POST /tokenize`` (vLLM's): :func:`.tokenize_api.tokenize`."""
        return await tokenize_api.tokenize(self, payload)

    def tokenizer_info(self) -> dict[str, Any]:
        """``GET /tokenizer_info`` (vLLM's): :func:`.tokenize_api.tokenizer_info`."""
        return tokenize_api.tokenizer_info(self)

    async def detokenize(self, payload: Any) -> dict[str, Any]:
        """``POST /detokenize`` (vLLM's): :func:`.tokenize_api.detokenize`."""
        return await tokenize_api.detokenize(self, payload)

    async def completions(self, request: Request, payload: Any) -> Response:
        """``POST /v1/completions`` (``max_tokens`` defaults to 16, as OpenAI's)."""
        req = parse(CompletionRequest, payload)
        adapter = self.adapter_for(req.model)  # an unknown model is a 404 before anything else is looked at (as vLLM)
        prompts = req.prompts()
        echo = None
        if req.echo:  # each prompt as given, or its ids' text; and its ids (a stream's first chunk scores them)
            texts = [p if isinstance(p, str) else await asyncio.to_thread(self._decode, p) for p in prompts]
            prompts = [await self._ids(p) for p in prompts]
            echo = [(t, p if isinstance(p, list) else []) for t, p in zip(texts, prompts)]
        if req.max_tokens is not None:
            prompts = [await self._fitting(p, max(req.max_tokens, 1), "max_tokens", req.prompt_param(i))
                       for i, p in enumerate(prompts)]  # fmt: skip
        max_tokens = 16 if req.max_tokens is None else max(req.max_tokens, 1)  # 0 (echo): one computed, dropped
        return await self._answer(request, req, adapter, prompts, max_tokens, req.logprobs, chat=False, echo=echo,
                                  generated=req.max_tokens != 0)

    async def responses(self, request: Request, payload: Any) -> Response:
        """``POST /v1/responses`` (OpenAI's Responses API): answered as the chat request it asks for
        (:mod:`.responses_request`), written back as a ``response`` object or its events (:mod:`.responses_output`);
        an error names the Responses field it came from."""
        req = parse(ResponsesRequest, payload)
        if self.responses_store is None:
            req.refuse_store()
        else:
            self.responses_store.attach(req)
        for name in ("temperature", "top_p"):  # left out: the model's default, which the response echoes as used
            if name not in req.model_fields_set and name in self.sampling_defaults:
                setattr(req, name, self.sampling_defaults[name])
        chat, origins = req.chat_payload()
        try:
            return await self.chat(request, chat, req)
        except APIError as err:
            raise req.renamed(err, origins) from None

    async def chat(self, request: Request, payload: Any, responses: ResponsesRequest | None = None) -> Response:
        """``POST /v1/chat/completions`` (``max_tokens`` defaults to the rest of the context); ``responses``: the
        Responses request it was read from, whose shape the answer takes."""
        req = parse(ChatCompletionRequest, payload)
        adapter = self.adapter_for(req.model)  # before the template is rendered and the context checked
        if req.parses_tools and self.response_template is None:
            given = repr(req.tool_choice) if req.tool_choice is not None else "'auto' (the default with tools)"
            raise APIError(400, f"tool_choice {given} needs the model's tool-call format to read calls out of its answer, "
                                f"and this server has none: start it with --tool-call-parser hermes (or a tokenizer "
                                f"with a response_template); or send 'required' or a named function (the answer is "
                                f"constrained to tool calls), or 'none' (the answer as text)", "tool_choice")  # fmt: skip
        max_tokens = req.max_completion_tokens or req.max_tokens or self.context
        prompt = await chat_prompt_off_loop(self.tokenizer, req.chat(), req.tool_specs(), req.template_options())
        if req.max_completion_tokens or req.max_tokens:  # given: it must fit (the default is what the context leaves)
            prompt = await self._fitting(prompt, max_tokens, "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        return await self._answer(request, req, adapter, [prompt], max_tokens, req.wanted_logprobs(), chat=True,
                                  responses=responses, echo=[(req.echoed(), [])] if req.echo else None)

    async def _fitting(self, prompt: Any, max_tokens: int, param: str, which: str = "prompt") -> Any:
        """``prompt``'s token ids, or a 400 naming ``param`` when the prompt and ``max_tokens`` pass the context the
        engine holds (as vLLM and OpenAI answer; it was cut there silently). A prompt that cannot be tokenized, or
        that alone fills the context, goes on as given: the engine refuses it with its own message. ``which`` names
        the prompt in the message (``prompt.2`` of several)."""
        ids = await self._ids(prompt)
        if not isinstance(ids, list):
            return prompt
        limit = self.engine.generator.scheduler.max_tokens_per_seq
        if len(ids) < limit < len(ids) + max_tokens:
            raise APIError(400, f"{param}={max_tokens} is too large: this model holds {limit} tokens of context and the "
                                f"{which} takes {len(ids)}, so at most {limit - len(ids)} can be generated", param)
        return ids

    async def _ids(self, prompt: Any) -> Any:
        """``prompt``'s token ids as the engine reads them, or the prompt as given when it has none (the engine then
        refuses it with its own message)."""
        gen = self.engine.generator
        try:
            return await asyncio.to_thread(prompt_ids, prompt, gen.tokenizer, gen.chat_template, gen.model.spec.vocab_size)
        except ValueError:
            return prompt

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise APIError(400, "echo needs a tokenizer to write the prompt's text, and this model has none", "echo")
        if any(not 0 <= t < self.engine.generator.model.spec.vocab_size for t in ids):
            return ""  # the engine refuses the prompt with its own message (a 400 naming prompt)
        return self.tokenizer.decode(ids)

    async def _answer(self, request: Request, req: Any, adapter: str | Literal[False] | None, prompts: list[Any],
                      max_tokens: int, logprobs: int | None, chat: bool, echo: list[tuple[str, list[int]]] | None = None,
                      generated: bool = True, responses: ResponsesRequest | None = None) -> Response:
        vocab = self.engine.generator.model.spec.vocab_size
        sps = [_with_adapter(req.sampling(max_tokens, logprobs, i, vocab, self.sampling_defaults), adapter)
               for i in range(req.n)]  # fmt: skip
        if sps[0].structured_outputs is not None:  # its grammar compiled off the event loop and the step loop
            await asyncio.to_thread(self.engine.prepare, sps[0])
        handles = self._submit_all([(p, sp) for p in prompts for sp in sps], req.priority)  # choice i: prompt i // n
        params = ["messages" if chat else req.prompt_param(i // req.n) for i in range(len(handles))]
        if req.stream:
            template = self._template() if chat and req.parses_tools else None
            return await stream(request, req, handles, chat, self.tokenizer, template, responses, params, echo, generated)
        outputs = await self._results(request, handles, params)
        if outputs is None:  # the client left: its requests are aborted and nobody reads an answer
            return Response(status_code=CLIENT_GONE)
        if chat:
            answer = chat_response(new_id("chatcmpl"), req.model, self.tokenizer, outputs, req.echoed(),
                                   req.prompt_logprobs)  # fmt: skip
            if req.forces_tools:
                answer = with_tool_calls(answer, req.tool_choice)
            elif req.parses_tools:
                answer = with_parsed_calls(answer, self._template(), req.tool_specs(), req.max_tool_calls)
            if responses is not None:
                answer = whole(responses, answer, outputs[0].metrics.cached_tokens)
            return JSONResponse(answer)
        return JSONResponse(completion_response(new_id("cmpl"), req.model, self.tokenizer, outputs, req.n,
                                                None if echo is None else [text for text, _ in echo], generated,
                                                (req.logprobs, req.prompt_logprobs)))  # fmt: skip

    # --- the application ------------------------------------------------------------------------
    def app(self) -> FastAPI:
        """The FastAPI application (:func:`.http_app.build_app`)."""
        return build_app(self)


def _with_adapter(sp: SamplingParams, adapter: str | Literal[False] | None) -> SamplingParams:
    from dataclasses import replace

    return sp if adapter is None else replace(sp, adapter=adapter)
