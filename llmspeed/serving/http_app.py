"""The FastAPI application of an :class:`~.server.OpenAIServer`: its routes, its API-key check and how every error
becomes an OpenAI-style JSON body.

:func:`build_app` only wires HTTP to the server's methods (:meth:`~.server.OpenAIServer.completions`,
:meth:`~.server.OpenAIServer.chat`, ...); what an endpoint answers is decided in :mod:`.server`.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_errors import APIError

if TYPE_CHECKING:
    from .server import OpenAIServer


def build_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI application serving ``server`` (:meth:`.server.OpenAIServer.app`)."""
    app = FastAPI(title="llmspeed", version="0.1.0", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        # the API only: a load balancer's /health probe and a Prometheus scrape of /metrics carry no key (as vLLM);
        # /tokenize and /detokenize (open in vLLM) render chat templates for whoever calls: guarded as the API is
        path = request.url.path
        if server.api_key is not None and (path.startswith("/v1") or path in ("/tokenize", "/detokenize", "/tokenizer_info")):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:  # unknown path, wrong method
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"{type(err).__name__}: {err}").body(), status_code=500)

    async def body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an int past Python's 4300 digits
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        except RecursionError:  # a client's nesting is no server error (nor a traceback in its log)
            raise APIError(400, "the request body is nested too deeply to decode as JSON") from None

    @app.api_route("/health", methods=["GET", "HEAD"])  # a load balancer may probe with HEAD
    async def health() -> Response:
        if server.engine.error is not None:  # as vLLM's: a dead engine is a 503 a load balancer takes out of rotation
            return JSONResponse({"status": "dead", "error": server.engine.error}, status_code=503)
        if server.engine.closed:
            return JSONResponse({"status": "closed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")  # vLLM's: the serving library's version, open as /health is
    async def version() -> dict[str, Any]:
        from .. import __version__

        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return server.model(name)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(request, await body(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await server.chat(request, await body(request))

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await server.responses(request, await body(request))

    @app.post("/tokenize")  # vLLM's, outside /v1 as there
    async def tokenize(request: Request) -> dict[str, Any]:
        return await server.tokenize(await body(request))

    @app.get("/tokenizer_info")  # vLLM's: with /tokenize and /detokenize, the remote tokenizer of eval harnesses
    async def tokenizer_info() -> dict[str, Any]:
        return server.tokenizer_info()

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return await server.detokenize(await body(request))

    if server.responses_store is not None:  # stored Responses API answers (OpenAI's retrieve and delete)
        store = server.responses_store

        @app.get("/v1/responses/{rid}")
        async def stored_response(rid: str) -> dict[str, Any]:
            return store.get(rid)

        @app.delete("/v1/responses/{rid}")
        async def delete_response(rid: str) -> dict[str, Any]:
            return store.delete(rid)

    if server.allow_runtime_lora:  # vLLM's runtime LoRA updating; absent (a 404) unless the server allows it
        from . import lora_api

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request) -> PlainTextResponse:
            return PlainTextResponse(await lora_api.load(server, await body(request)))

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request) -> PlainTextResponse:
            return PlainTextResponse(await lora_api.unload(server, await body(request)))

    return app


__all__ = ["build_app"]
