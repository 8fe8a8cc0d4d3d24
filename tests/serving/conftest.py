"""Serving tests: one intra-op thread, and a live OpenAI-compatible server on a free 127.0.0.1 port, stopped when the test ends."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest


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
