"""Serving tests: one intra-op thread, a live OpenAI-compatible server on a free 127.0.0.1 port (stopped when the
test ends), the helpers that post JSON and check an OpenAI-shaped error, and the prompts the ``test_engine*.py``
files share."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import httpx


@contextmanager
def serve(server, timeout: float = 30.0):
    """Run ``server`` (an OpenAIServer) with uvicorn in a thread; yield its base URL; stop it and its engine."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(server.app(), host="127.0.0.1", port=port, log_level="error", lifespan="off")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not uv.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout)
        server.engine.close()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every serving test runs with one intra-op thread (see ``one_thread``)."""


@pytest.fixture
def tiny_server(llama):
    """An OpenAIServer named "tiny" over a tiny random Llama with a byte-level chat tokenizer."""
    from llmspeed.serving import Engine
    from llmspeed.serving.server import OpenAIServer
    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    return OpenAIServer(Engine(llama, kv_cache_tokens=4096), "tiny")


def openai_client(url: str):
    """The official ``openai`` client on the server at ``url``: no retries, a 60 s timeout."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture
def live_server():
    """``live_server(openai_server) -> context manager yielding the base URL``."""
    return serve


def _prompts(n, seed=0):
    """``n`` random prompts of 3 to 23 token ids (1 to 255), seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (int(k),), generator=g).tolist() for k in torch.randint(3, 24, (n,), generator=g)]


def _alone(model, prompts, sp):
    """Each prompt's token ids run alone on a fresh Generator (what a batch must give each of them)."""
    from llmspeed import Generator

    return [Generator(model, progress=False).generate_batched([p], sp)[0].token_ids for p in prompts]


def fail_third_sampling_call(monkeypatch) -> None:
    """Make the generator's ``sample_batch`` raise ``RuntimeError("injected sampler fault")`` on its third call."""
    from llmspeed.generation import engine as engine_module

    real, calls = engine_module.sample_batch, [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected sampler fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "sample_batch", flaky)


def post_json(url: str, path: str, body) -> httpx.Response:
    """POST ``body`` as JSON to ``url + path`` (60 s timeout), written by Python's ``json``: ``float("inf")`` goes as
    ``Infinity``, which the server's ``json`` reads back."""
    import json

    import httpx

    content = json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None) -> str:
    """Check that ``r`` is an OpenAI-shaped error with ``status`` naming ``param``; return its message."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status == 400 else error["type"])
    assert error["param"] == param, error
    return error["message"]
