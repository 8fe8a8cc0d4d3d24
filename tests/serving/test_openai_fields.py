"""Request bounds and response fields as OpenAI's API has them, at their edges (tiny random Llama, CPU).

Each test here pins a value a hand-made mutation of the server changed without any other serving test noticing:
a bound moved by one, a field of the response left out or written wrong."""

from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "hi"}]


def _post(url, path, body):
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def _error(r, status, param):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return error["message"]


BOUNDS = [  # (path, field, the last value taken, the first refused, other fields it needs)
    ("/v1/chat/completions", "temperature", 2, 2.5, {}),
    ("/v1/chat/completions", "n", 16, 17, {}),
    ("/v1/chat/completions", "top_logprobs", 20, 21, {"logprobs": True}),
    ("/v1/completions", "logprobs", 20, 21, {}),
    ("/v1/completions", "max_tokens", 1, 0, {}),
    ("/v1/chat/completions", "max_completion_tokens", 1, 0, {}),
]


@pytest.mark.parametrize("path,field,taken,refused,extra", BOUNDS, ids=[f"{b[1]}={b[3]}" for b in BOUNDS])
def test_a_bound_takes_its_last_value_and_refuses_the_next_naming_the_field(tiny_server, live_server, path, field,
                                                                            taken, refused, extra):
    base = {"model": "tiny", "max_tokens": 1, **extra, **({"messages": CHAT} if "chat" in path else {"prompt": "hi"})}
    with live_server(tiny_server) as url:
        ok = _post(url, path, {**base, field: taken})
        assert ok.status_code == 200, ok.text
        assert f"(got {refused!r})" in _error(_post(url, path, {**base, field: refused}), 400, field)


def test_two_prompts_in_one_request_are_a_400_not_the_first_answered(tiny_server, live_server):
    with live_server(tiny_server) as url:
        for prompt in (["a", "b"], [[5], [6]]):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 2}
            assert "got 2" in _error(_post(url, "/v1/completions", body), 400, "prompt")
        one = _post(url, "/v1/completions", {"model": "tiny", "prompt": [[5, 6]], "max_tokens": 2})
        assert one.status_code == 200 and one.json()["usage"]["prompt_tokens"] == 2


def test_max_tokens_that_exactly_fills_the_context_is_taken(tiny_server, live_server):
    limit = tiny_server.engine.generator.scheduler.max_tokens_per_seq
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "prompt": [5, 6]}
        full = _post(url, "/v1/completions", {**body, "max_tokens": limit - 2, "min_tokens": limit - 2})
        assert full.status_code == 200, full.text
        assert full.json()["usage"]["completion_tokens"] == limit - 2
        r = _post(url, "/v1/completions", {**body, "max_tokens": limit - 1})
        assert f"at most {limit - 2} can be generated" in _error(r, 400, "max_tokens")
