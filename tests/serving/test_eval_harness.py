"""The server as an evaluation harness's backend: lm-evaluation-harness's ``local-completions`` model sends a batch of
prompts per ``/v1/completions`` request (token ids: context + continuation, ``echo``, ``max_tokens: 1``,
``logprobs: 1``; or texts with ``stop`` for generation) and reads the tokenizer through ``/tokenizer_info``,
``/tokenize`` (``add_special_tokens: false``) and ``/detokenize``. The payloads here are the ones it sends, read the
way it reads them, against transformers' forward pass."""

from __future__ import annotations

import json
from operator import itemgetter

import httpx
import pytest
import torch

from tests.serving.conftest import assert_error, post_json

PAIRS = [("Hello there", " friend"), ("ab", "cdef"), ("The sea is", " deep and wide")]


def _loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """transformers' log-likelihood of ``continuation`` after ``context``, and whether greedy decoding writes it."""
    with torch.inference_mode():
        lp = torch.log_softmax(model.hf(torch.tensor([context + continuation])).logits[0].float(), -1)  # [P, V]
    rows = lp[len(context) - 1: len(context) - 1 + len(continuation)]  # [C, V]
    picked = rows[torch.arange(len(continuation)), torch.tensor(continuation)]
    return float(picked.sum()), bool((rows.argmax(-1) == torch.tensor(continuation)).all())


def test_a_batch_of_loglikelihood_requests_is_scored_as_transformers_scores_it(llama, tiny_server, live_server):
    contexts = [list(c.encode("latin-1")) for c, _ in PAIRS]  # the byte-level test tokenizer
    continuations = [list(x.encode("latin-1")) for _, x in PAIRS]
    with live_server(tiny_server) as url:
        r = post_json(url, "/v1/completions", {"model": "tiny", "prompt": [c + x for c, x in zip(contexts, continuations)],
                                               "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
                                               "echo": True})  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()
    choices = sorted(out["choices"], key=itemgetter("index"))
    assert [c["index"] for c in choices] == [0, 1, 2]
    for choice, context, continuation in zip(choices, contexts, continuations):
        ctxlen = len(context)  # as the harness reads it: the continuation's entries, not the generated token's
        got = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
        greedy = all(v == max(top.values()) for v, top in zip(choice["logprobs"]["token_logprobs"][ctxlen:-1],
                                                                choice["logprobs"]["top_logprobs"][ctxlen:-1]))  # fmt: skip
        want, want_greedy = _loglikelihood(llama, context, continuation)
        assert got == pytest.approx(want, abs=1e-3) and greedy == want_greedy
    assert out["usage"]["prompt_tokens"] == sum(len(c) + len(x) for c, x in zip(contexts, continuations))
    assert out["usage"]["completion_tokens"] == 3


def test_several_prompts_get_what_each_gets_alone(tiny_server, live_server):
    prompts = ["Once upon", "The answer is", "xyz"]
    body = {"model": "tiny", "temperature": 0, "max_tokens": 12, "seed": 1234}
    with live_server(tiny_server) as url:
        alone = [post_json(url, "/v1/completions", {**body, "prompt": p}).json()["choices"][0]["text"] for p in prompts]
        together = post_json(url, "/v1/completions", {**body, "prompt": prompts}).json()
        assert [c["text"] for c in sorted(together["choices"], key=itemgetter("index"))] == alone
        twice = post_json(url, "/v1/completions", {**body, "prompt": prompts, "n": 2, "temperature": 1.0}).json()
        firsts = [post_json(url, "/v1/completions", {**body, "prompt": p, "n": 2, "temperature": 1.0}).json()
                  for p in prompts]  # fmt: skip
        # choice i answers prompt i // n (OpenAI's order), each prompt's choices sampled with seed + j
        assert [c["text"] for c in twice["choices"]] == [c["text"] for f in firsts for c in f["choices"]]
        assert [c["index"] for c in twice["choices"]] == list(range(6))
        assert twice["usage"]["prompt_tokens"] == sum(f["usage"]["prompt_tokens"] for f in firsts)

        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "prompt": prompts, "stream": True},
                          timeout=60) as r:  # fmt: skip
            texts = [""] * len(prompts)
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        texts[c["index"]] += c["text"]
        assert texts == alone


@pytest.mark.parametrize(("prompt", "max_tokens", "param", "said"), [
    (["fine", ""], 4, "prompt.1", "prompt.1 is empty"),
    ([[1, 2], []], 4, "prompt.1", "prompt.1 is empty"),
    (["fine", "x" * 5000], 4, "prompt.1", None),  # longer than the context: the engine's refusal names it
    (["fine", "x" * 450], 100, "max_tokens", "prompt.1 takes 450"),  # prompt + max_tokens past it
])  # fmt: skip
def test_a_bad_prompt_among_several_is_a_400_naming_it(tiny_server, live_server, prompt, max_tokens, param, said):
    with live_server(tiny_server) as url:
        r = post_json(url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens})
        message = assert_error(r, 400, param)
        assert said is None or said in message, message


def test_a_refused_prompt_among_several_streamed_is_always_a_400(tiny_server, live_server):
    """Regression: streamed, a prompt the engine refuses (longer than the context) after one it admits was a 400 or,
    when the first prompt's token arrived first, a stream ending in an error event, depending on timing. The prompts
    of a request are now admitted in one turn of the engine, and the stream starts only when none was refused."""
    body = {"model": "tiny", "prompt": ["fine", "x" * 5000, "also fine"], "max_tokens": 4, "stream": True}
    with live_server(tiny_server) as url:
        for _ in range(12):
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                r.read()
            assert r.status_code == 400, r.text
            assert json.loads(r.text)["error"]["param"] == "prompt.1"
        ok = post_json(url, "/v1/completions", {**body, "prompt": ["fine", "also fine"], "stream": False})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2  # nothing left behind by the refusals


class _BosTokenizer:
    """A byte-level tokenizer that puts a BOS (id 1) before a sequence unless told not to, as Llama's does."""

    bos_token, eos_token, pad_token, unk_token = "<s>", "</s>", None, None
    eos_token_id = 2
    chat_template = "{{ messages[0]['content'] }}"

    def __len__(self) -> int:
        return 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + list(text.encode("latin-1"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("latin-1")


def test_the_remote_tokenizer_endpoints(llama, live_server):
    from llmspeed.serving import Engine
    from llmspeed.serving.server import OpenAIServer

    llama.tokenizer = _BosTokenizer()
    with live_server(OpenAIServer(Engine(llama, kv_cache_tokens=4096), "tiny")) as url:
        info = httpx.get(f"{url}/tokenizer_info", timeout=30).json()
        assert info == {"tokenizer_class": "_BosTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": None,
                        "unk_token": None, "chat_template": _BosTokenizer.chat_template, "vocab_size": 256,
                        "max_model_len": info["max_model_len"]}  # fmt: skip
        assert info["max_model_len"] == post_json(url, "/tokenize", {"prompt": "a"}).json()["max_model_len"]
        plain = post_json(url, "/tokenize", {"prompt": "hi", "add_special_tokens": False}).json()["tokens"]
        default = post_json(url, "/tokenize", {"prompt": "hi"}).json()["tokens"]
        assert (plain, default) == ([104, 105], [1, 104, 105])  # the default: what completions run
        assert post_json(url, "/tokenize", {"prompt": "hi", "add_special_tokens": True}).json()["tokens"] == default
        assert_error(post_json(url, "/tokenize", {"messages": [{"role": "user", "content": "hi"}],
                                                  "add_special_tokens": False}), 400, "add_special_tokens")  # fmt: skip


def test_tokenizer_info_is_smollm2s(smollm2_cached, live_server):
    from llmspeed.serving import Engine
    from llmspeed.serving.server import OpenAIServer

    tok = smollm2_cached.tokenizer
    with live_server(OpenAIServer(Engine(smollm2_cached, kv_cache_tokens=1024), "smollm2")) as url:
        info = httpx.get(f"{url}/tokenizer_info", timeout=30).json()
        text = "The capital of France is Paris."
        plain = post_json(url, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert (info["eos_token"], info["bos_token"], info["chat_template"]) == (tok.eos_token, tok.bos_token,
                                                                             tok.chat_template)  # fmt: skip
    assert info["vocab_size"] == len(tok) and plain == tok.encode(text, add_special_tokens=False)
