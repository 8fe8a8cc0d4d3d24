"""vLLM's runtime LoRA updating (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``): an adapter loaded while the
server runs answers as one loaded before it started, requests already running keep their exact tokens, unloading
ends only the requests bound to it, and every bad request is named and changes nothing."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from llmspeed import Generator, SamplingParams, lora
from llmspeed.generation import engine as engine_module
from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer
from tests.generation.conftest import random_adapter
from tests.generation.test_engine import ChatTokenizer
from tests.serving.conftest import assert_error, post_json

PROMPT = [5, 6, 7, 8]


def _adapter_folder(model, path, seed):
    """Save a random adapter (non-zero B: it changes the tokens) of ``model`` at ``path``; leave the model as it was."""
    name = f"tmp{seed}"
    random_adapter(model, name, seed)
    lora.save_adapter(model, path, name)
    lora.delete_adapter(model, name)
    return path


def _offline(model, folder, n=8):
    """The greedy tokens of ``PROMPT`` with the adapter at ``folder`` loaded before anything runs."""
    lora.load_adapter(model, folder, "offline")
    try:
        return Generator(model, progress=False).generate_batched(
            [PROMPT], SamplingParams(max_new_tokens=n, ignore_eos=True, adapter="offline"))[0].token_ids
    finally:
        lora.delete_adapter(model, "offline")


def _ids(url, model, n=8):
    r = post_json(url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0,
                                           "ignore_eos": True, "logprobs": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


@pytest.fixture
def folders(llama, tmp_path):
    return [_adapter_folder(llama, tmp_path / f"a{k}", k + 1) for k in range(2)]


def _server(model, **kw):
    model.tokenizer = ChatTokenizer()
    return OpenAIServer(Engine(model, kv_cache_tokens=4096), "tiny", allow_runtime_lora=True, **kw)


def test_off_unless_allowed(tiny_server, live_server, folders):
    with live_server(tiny_server) as url:
        r = post_json(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(folders[0])})
        assert r.status_code == 404
    assert lora.adapter_names(tiny_server.engine.model) == []


def test_a_loaded_adapter_answers_as_one_loaded_before_and_the_base_is_untouched(llama, live_server, folders):
    want = [_offline(llama, f) for f in folders]
    base = Generator(llama, progress=False).generate_batched(
        [PROMPT], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    assert len({tuple(w) for w in [*want, base]}) == 3  # the adapters change the tokens
    with live_server(_server(llama)) as url:
        text = [ChatTokenizer().decode([t]) for t in base]
        assert _ids(url, "tiny") == text
        r = post_json(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(folders[0])})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a' added successfully."
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["tiny", "a"]
        assert _ids(url, "a") == [ChatTokenizer().decode([t]) for t in want[0]]
        assert _ids(url, "tiny") == text  # the base model alone: the new adapter is not active
        r = post_json(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(folders[1]),
                                                     "load_inplace": True})  # fmt: skip
        assert r.status_code == 200 and _ids(url, "a") == [ChatTokenizer().decode([t]) for t in want[1]]
        r = post_json(url, "/v1/unload_lora_adapter", {"lora_name": "a"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a' removed successfully."
        assert_error(post_json(url, "/v1/completions", {"model": "a", "prompt": "hi"}), 404, "model")
        assert _ids(url, "tiny") == text
    assert lora.adapter_names(llama) == []


def test_a_base_request_running_through_a_load_keeps_its_exact_tokens(llama, live_server, folders, monkeypatch):
    """The load activates the adapter it adds (``lora.load_adapter``); the server sets the active adapter back under
    the same step-lock hold, so no step of a running base request (no adapters served: it runs the model as set) ever
    meets it."""
    want = Generator(llama, progress=False).generate_batched(
        [PROMPT], SamplingParams(max_new_tokens=60, ignore_eos=True))[0].token_ids
    real = engine_module.sample_batch
    monkeypatch.setattr(engine_module, "sample_batch", lambda *a, **k: (time.sleep(0.01), real(*a, **k))[1])
    with live_server(_server(llama)) as url:
        answer = []
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "ignore_eos": True, "logprobs": 0}
        asker = threading.Thread(target=lambda: answer.append(post_json(url, "/v1/completions", body)))
        asker.start()
        time.sleep(0.2)  # some tokens in
        assert post_json(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(folders[0])}).status_code == 200
        asker.join(60)
        assert answer[0].json()["choices"][0]["logprobs"]["tokens"] == [ChatTokenizer().decode([t]) for t in want]


def test_unloading_ends_only_the_requests_running_that_adapter(llama, live_server, folders, monkeypatch):
    real = engine_module.sample_batch
    monkeypatch.setattr(engine_module, "sample_batch", lambda *a, **k: (time.sleep(0.01), real(*a, **k))[1])
    server = _server(llama)
    with live_server(server) as url:
        for name, folder in zip("ab", folders):
            assert post_json(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)}).status_code == 200
        want_b = _ids(url, "b", 40)
        answers: dict[str, httpx.Response] = {}
        body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "logprobs": 0}
        askers = [threading.Thread(target=lambda m=m: answers.update({m: post_json(url, "/v1/completions",
                                                                                   {**body, "model": m})}))
                  for m in "ab"]  # fmt: skip
        for t in askers:
            t.start()
        time.sleep(0.2)
        assert post_json(url, "/v1/unload_lora_adapter", {"lora_name": "a"}).status_code == 200
        for t in askers:
            t.join(60)
        assert answers["a"].status_code == 500 and "adapter 'a' was deleted" in answers["a"].json()["error"]["message"]
        assert answers["b"].json()["choices"][0]["logprobs"]["tokens"] == want_b
        assert server.adapters == ("b",) and lora.adapter_names(llama) == ["b"]


def test_bad_requests_are_named_and_change_nothing(llama, live_server, folders, tmp_path):
    (tmp_path / "empty").mkdir()
    server = _server(llama, api_key="k")
    auth = {"Authorization": "Bearer k"}
    with live_server(server) as url:
        def post(path, body):
            return httpx.post(f"{url}{path}", json=body, headers=auth, timeout=60)

        assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(folders[0])},
                          timeout=60).status_code == 401  # fmt: skip
        assert post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(folders[0])}).status_code == 200
        before = lora.adapter_names(llama)
        for body, param in [
            ({"lora_name": "a", "lora_path": str(folders[1])}, "lora_name"),  # taken, and no load_inplace
            ({"lora_name": "tiny", "lora_path": str(folders[1])}, "lora_name"),  # the base model's name
            ({"lora_name": "c", "lora_path": str(tmp_path / "nowhere")}, "lora_path"),
            ({"lora_name": "c", "lora_path": str(tmp_path / "empty")}, "lora_path"),  # no adapter files
            ({"lora_name": "a", "lora_path": str(tmp_path / "empty"), "load_inplace": True}, "lora_path"),
            ({"lora_name": "c", "lora_path": str(folders[1]), "extra": 1}, "extra"),
        ]:
            assert_error(post("/v1/load_lora_adapter", body), 400, param)
        assert_error(post("/v1/unload_lora_adapter", {"lora_name": "zzz"}), 404, "lora_name")
        assert lora.adapter_names(llama) == before and server.adapters == ("a",)
        r = httpx.post(f"{url}/v1/completions", headers=auth, timeout=60,
                       json={"model": "a", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200  # the failed in-place load left "a" serving
