"""``echo`` on ``/v1/completions`` (OpenAI's and vLLM's): the prompt's text before each choice's, and with ``logprobs``
every prompt token's log-probability (the first ``null``), equal to transformers' forward pass; ``max_tokens: 0``
scores the prompt alone, as evaluation harnesses ask for it; streamed, the chunks add up to the whole answer."""

from __future__ import annotations

import pytest
import torch

from tests.serving.conftest import assert_error, openai_client, post_json

openai = pytest.importorskip("openai")


def _reference(model, ids):
    with torch.inference_mode():
        return torch.log_softmax(model.hf(torch.tensor([ids])).logits[0].float(), -1)  # [P, V]


def test_echo_with_max_tokens_0_scores_the_prompt_as_transformers_does(llama, tiny_server, live_server):
    text = "Hello there"
    ids = list(text.encode("latin-1"))  # the byte-level test tokenizer
    ref = _reference(llama, ids)
    with live_server(tiny_server) as url:
        out = openai_client(url).completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text == text and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert "".join(lp.tokens) == text and lp.text_offset == list(range(len(ids)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
        best = ref[j - 1].topk(2).indices.tolist()
        assert set(lp.top_logprobs[j]) == {chr(t) for t in best} | {text[j]}  # the 2 best and the token itself


def test_echo_puts_the_prompt_before_each_generated_choice(tiny_server, live_server):
    with live_server(tiny_server) as url:
        client = openai_client(url)
        kw = dict(model="tiny", prompt="abc", max_tokens=3, temperature=0, extra_body={"min_tokens": 3})
        plain = client.completions.create(**kw, logprobs=1)
        echoed = client.completions.create(**kw, logprobs=1, echo=True, n=2)
        for choice in echoed.choices:
            assert choice.text == "abc" + plain.choices[0].text
            lp = choice.logprobs
            assert lp.tokens[3:] == plain.choices[0].logprobs.tokens and lp.token_logprobs[0] is None
            assert lp.token_logprobs[3:] == plain.choices[0].logprobs.token_logprobs
            assert lp.text_offset == list(range(6))  # the generated tokens' offsets follow the echoed prompt
        assert echoed.usage.completion_tokens == 6  # two choices of three tokens
        bare = client.completions.create(**kw, echo=True)
        assert bare.choices[0].text == "abc" + plain.choices[0].text and bare.choices[0].logprobs is None
        ids = client.completions.create(model="tiny", prompt=[104, 105], max_tokens=0, echo=True)
        assert ids.choices[0].text == "hi"  # token ids are echoed as their text


@pytest.mark.parametrize("fields,param,quoted", [
    ({"max_tokens": 0}, "max_tokens", "0 is only taken with echo: true"),
    ({"echo": "yes"}, "echo", "'yes'"),
    ({"max_tokens": -1, "echo": True}, "max_tokens", "-1"),
])  # fmt: skip
def test_echo_requests_it_cannot_answer_are_400s_naming_the_field(tiny_server, live_server, fields, param, quoted):
    with live_server(tiny_server) as url:
        message = assert_error(post_json(url, "/v1/completions", {"model": "tiny", "prompt": "hi", **fields}), 400, param)
        assert quoted in message


def test_echo_scores_smollm2s_bpe_prompt_as_transformers_does(smollm2, live_server):
    from llmspeed.serving import Engine
    from llmspeed.serving.server import OpenAIServer

    text = "The capital of France is Paris, and Berlin is"
    ids = smollm2.tokenizer.encode(text)
    ref = _reference(smollm2, ids)
    with live_server(OpenAIServer(Engine(smollm2, kv_cache_tokens=2048), "smollm2")) as url:
        out = openai_client(url).completions.create(model="smollm2", prompt=text, max_tokens=0, echo=True, logprobs=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == text and "".join(lp.tokens) == text and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([float(ref[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-3)
    assert all(lp.text_offset[j] == len("".join(lp.tokens[:j])) for j in range(len(ids)))


def _joined(chunks, choices):
    """Per choice index: the streamed text, legacy logprobs lists joined, and the last finish reason."""
    out = [{"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [], "finish": None}
           for _ in range(choices)]
    for chunk in chunks:
        for c in chunk.choices:
            o = out[c.index]
            o["text"] += c.text
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    o[key] += getattr(c.logprobs, key)
            o["finish"] = c.finish_reason or o["finish"]
    return out


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_streamed_echo_adds_up_to_the_whole_answer(tiny_server, live_server, max_tokens):
    kw = dict(model="tiny", prompt=["abcd", "hi!"], max_tokens=max_tokens, temperature=0, echo=True,
              logprobs=2, n=2, extra_body={"min_tokens": max_tokens})
    with live_server(tiny_server) as url:
        client = openai_client(url)
        whole = client.completions.create(**kw)
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = _joined(chunks, 4)
    for choice, got in zip(whole.choices, streamed):
        assert got["text"] == choice.text and got["text"].startswith(("abcd", "hi!"))
        assert got["finish"] == choice.finish_reason
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert got[key] == getattr(choice.logprobs, key), key
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # max_tokens 0: no completion tokens
    firsts = [next(c for c in chunks if c.choices and c.choices[0].index == i) for i in range(4)]
    assert [f.choices[0].text[:len(p)] for f, p in zip(firsts, ["abcd", "abcd", "hi!", "hi!"])] == ["abcd", "abcd", "hi!", "hi!"]
    assert [f.choices[0].logprobs.token_logprobs[0] for f in firsts] == [None] * 4  # the prompt's first token

