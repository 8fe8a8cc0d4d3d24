"""``max_model_len`` (vLLM's ``--max-model-len``): a request's prompt and answer held to fewer tokens than the model's
context, in the engine's refusals, the server's checks of ``max_tokens``, chat's default ``max_tokens`` and what
``/tokenize`` reports; a value past the model's context, or not an int, is refused by name."""

from __future__ import annotations

import pytest

from llmspeed import Generator, SamplingParams
from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer
from tests.serving.conftest import assert_error, post_json


def test_the_generator_holds_requests_to_it(llama):
    gen = Generator(llama, progress=False, max_model_len=24)
    out = gen.generate_batched([[1] * 10, [2] * 30], SamplingParams(max_new_tokens=100, ignore_eos=True))
    assert len(out[0].token_ids) == 24 - 10 and out[0].finish_reason == "length"
    assert out[1].finish_reason == "error" and "the model's context holds 24 here: max_model_len=24" in out[1].error
    assert Generator(llama, progress=False).scheduler.max_seq_len == 512  # the tiny model's positions


@pytest.mark.parametrize("bad", [513, 1, 0, 2.5, True, "24"])
def test_a_length_past_the_model_or_not_an_int_is_refused_by_name(llama, bad):
    with pytest.raises(ValueError, match=rf"max_model_len must be None or an int from 2 .* to 512, the most this model "
                                         rf"holds here; got {bad!r}"):  # fmt: skip
        Generator(llama, progress=False, max_model_len=bad)


def test_the_server_checks_and_reports_it(llama, live_server):
    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    with live_server(OpenAIServer(Engine(llama, kv_cache_tokens=4096, max_model_len=40), "tiny")) as url:
        message = assert_error(post_json(url, "/v1/completions", {"model": "tiny", "prompt": "x" * 30, "max_tokens": 20}),
                               400, "max_tokens")  # fmt: skip
        assert "holds 40 tokens of context and the prompt takes 30, so at most 10 can be generated" in message
        chat = post_json(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                       "temperature": 0, "ignore_eos": True}).json()  # fmt: skip
        assert chat["usage"]["total_tokens"] == 40  # the default max_tokens: what the context leaves
        assert post_json(url, "/tokenize", {"model": "tiny", "prompt": "hi"}).json()["max_model_len"] == 40
        import httpx

        assert httpx.get(f"{url}/v1/models/tiny").json()["max_model_len"] == 40  # the model card's, as vLLM's


def test_the_cli_flag_reaches_the_engine_and_a_length_past_the_model_is_named(llama, monkeypatch):
    from llmspeed.serving import cli

    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: llama)
    engine, server = cli.build(cli.build_parser().parse_args(["--kv-cache-tokens", "64", "--max-model-len", "32"]))
    engine.close()
    assert engine.generator.scheduler.max_seq_len == 32 and server.context == 32
    with pytest.raises(SystemExit, match="--max-model-len 9999: max_model_len must be None or an int from 2"):
        cli.build(cli.build_parser().parse_args(["--kv-cache-tokens", "64", "--max-model-len", "9999"]))
