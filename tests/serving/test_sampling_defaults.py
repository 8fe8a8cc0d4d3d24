"""Sampling defaults from the model's generation config (vLLM's ``--generation-config auto``, its default): a request
that leaves ``temperature``, ``top_p``, ``top_k``, ``min_p`` or ``repetition_penalty`` out samples with the model's
values, one that gives them with its own; ``"vllm"`` keeps the OpenAI API's defaults; a folder's
``generation_config.json`` can stand in for the model's."""

from __future__ import annotations

import json

import pytest

from llmspeed.serving import Engine
from llmspeed.serving.sampling_defaults import sampling_defaults
from llmspeed.serving.server import OpenAIServer
from tests.serving.conftest import post_json

PROMPT = {"model": "tiny", "prompt": "abc", "max_tokens": 8, "seed": 5, "extra": None}


def _server(llama, source="auto"):
    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    return OpenAIServer(Engine(llama, kv_cache_tokens=4096), "tiny", generation_config=source)


def _text(url, path="/v1/completions", **fields):
    body = {k: v for k, v in {**PROMPT, **fields}.items() if k != "extra"}
    if path == "/v1/responses":
        body = {"model": "tiny", "input": "abc", "max_output_tokens": 8, **fields}
    r = post_json(url, path, body)
    assert r.status_code == 200, r.text
    answer = r.json()
    return answer["output"][0]["content"][0]["text"] if path == "/v1/responses" else answer["choices"][0]["text"]


def test_a_request_leaving_sampling_out_takes_the_models_generation_config(llama, live_server):
    llama.hf.generation_config.top_k = 1  # the model says: always the most likely token
    server = _server(llama)
    assert server.sampling_defaults == {"top_k": 1}
    with live_server(server) as url:
        greedy = _text(url, temperature=0)
        assert _text(url) == greedy  # temperature 1 (the API's default) and the model's top_k 1
        assert _text(url, top_k=0) != greedy  # given: the request's own value, every token in play

def test_the_responses_api_leaves_out_what_its_request_leaves_out(llama, live_server):
    """Regression: its chat request always carried temperature 1 and top_p 1, so the model's top_p never applied."""
    llama.hf.generation_config.top_p = 1e-6  # a nucleus of the most likely token alone
    with live_server(_server(llama)) as url:
        greedy = _text(url, "/v1/responses", temperature=0)
        assert _text(url, "/v1/responses") == greedy
        assert _text(url, "/v1/responses", top_p=1.0) != greedy
        echoed = post_json(url, "/v1/responses", {"model": "tiny", "input": "abc", "max_output_tokens": 2}).json()
        assert echoed["top_p"] == 1e-6 and echoed["temperature"] == 1.0  # the values used, as the response says


def test_vllm_keeps_the_api_defaults_and_a_folder_stands_in_for_the_model(llama, live_server, tmp_path):
    llama.hf.generation_config.top_k = 1
    with live_server(_server(llama, "vllm")) as url:
        assert _text(url) != _text(url, temperature=0)  # the model's top_k ignored
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 1, "temperature": 0.5, "do_sample": True}))
    assert sampling_defaults(llama, str(tmp_path)) == {"top_k": 1, "temperature": 0.5}
    with pytest.raises(ValueError, match=r"generation_config must be one of \['auto', 'vllm'\] or a folder holding "
                                         r"generation_config.json; got 'nowhere'"):  # fmt: skip
        sampling_defaults(llama, "nowhere")


def test_the_cli_flag_reaches_the_server_and_a_bad_one_is_named(llama, monkeypatch, capsys):
    from llmspeed.serving import cli

    llama.hf.generation_config.temperature, llama.hf.generation_config.do_sample = 0.25, True
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: llama)
    engine, server = cli.build(cli.build_parser().parse_args(["--kv-cache-tokens", "64"]))
    engine.close()
    assert server.sampling_defaults == {"temperature": 0.25}
    assert "sample with the model's generation config: {'temperature': 0.25}" in capsys.readouterr().out
    engine, server = cli.build(cli.build_parser().parse_args(["--kv-cache-tokens", "64", "--generation-config", "vllm"]))
    engine.close()
    assert server.sampling_defaults == {}
    with pytest.raises(SystemExit, match="--generation-config: generation_config must be one of"):
        cli.build(cli.build_parser().parse_args(["--kv-cache-tokens", "64", "--generation-config", "nowhere"]))
