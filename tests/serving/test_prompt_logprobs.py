"""``prompt_logprobs`` (vLLM's extension, on ``/v1/completions`` and ``/v1/chat/completions``): each prompt token's
log-probability, rank and most likely alternatives, equal to transformers' forward pass; with ``echo`` each view
keeps its own count of alternatives; streaming and out-of-range counts are 400s naming the field."""

from __future__ import annotations

import pytest
import torch

from tests.serving.conftest import assert_error, openai_client, post_json


def _reference(model, ids):
    with torch.inference_mode():
        return torch.log_softmax(model.hf(torch.tensor([ids])).logits[0].float(), -1)  # [P, V]


def _assert_matches(entries, ids, ref, alternatives, decode):
    """``entries`` (vLLM's prompt_logprobs) against transformers' log-softmax ``ref`` of ``ids``."""
    assert len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        row = ref[j - 1]  # [V]: the distribution of token j
        order = row.argsort(descending=True).tolist()
        best = order[:alternatives]
        assert set(entries[j]) == {str(t) for t in best} | {str(ids[j])}
        token = entries[j][str(ids[j])]
        assert token["logprob"] == pytest.approx(float(row[ids[j]]), abs=1e-4)
        assert token["rank"] == order.index(ids[j]) + 1  # 1 is the most likely, as vLLM's rank
        assert token["decoded_token"] == decode(ids[j])
        for r, t in enumerate(best, 1):
            assert entries[j][str(t)]["logprob"] == pytest.approx(float(row[t]), abs=1e-4)
            assert entries[j][str(t)]["rank"] == r


def test_completions_prompt_logprobs_are_transformers_log_softmax_with_ranks(llama, tiny_server, live_server):
    text = "Hello there, friend"
    ids = list(text.encode("latin-1"))  # the byte-level test tokenizer
    ref = _reference(llama, ids)
    with live_server(tiny_server) as url:
        body = {"model": "tiny", "prompt": text, "max_tokens": 2, "prompt_logprobs": 3, "n": 2, "temperature": 0}
        r = post_json(url, "/v1/completions", body)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        plain = post_json(url, "/v1/completions", {**body, "prompt_logprobs": None}).json()["choices"]
    assert len(choices) == 2 and choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"]  # each choice has them
    _assert_matches(choices[0]["prompt_logprobs"], ids, ref, 3, chr)
    assert [c["text"] for c in choices] == [c["text"] for c in plain]  # scoring the prompt changes no answer
    assert "prompt_logprobs" not in plain[0] and choices[0]["logprobs"] is None


def test_echo_and_prompt_logprobs_each_keep_their_own_alternatives(llama, tiny_server, live_server):
    text = "abcdef"
    ids = list(text.encode("latin-1"))
    ref = _reference(llama, ids)
    with live_server(tiny_server) as url:
        out = openai_client(url).completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1,
                                                    extra_body={"prompt_logprobs": 4})  # fmt: skip
    choice = out.choices[0]
    _assert_matches(choice.model_extra["prompt_logprobs"], ids, ref, 4, chr)
    lp = choice.logprobs
    assert lp.top_logprobs[0] is None
    for j in range(1, len(ids)):  # echo's legacy entries: logprobs=1 alternative and the token itself
        best = ref[j - 1].argmax().item()
        assert set(lp.top_logprobs[j]) == {chr(best), text[j]}


def test_chat_prompt_logprobs_cover_the_rendered_prompt(llama, tiny_server, live_server):
    messages = [{"role": "user", "content": "Say hi"}]
    with live_server(tiny_server) as url:
        ids = post_json(url, "/tokenize", {"model": "tiny", "messages": messages}).json()["tokens"]
        r = post_json(url, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 2,
                                                     "prompt_logprobs": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["usage"]["prompt_tokens"] == len(ids)
    _assert_matches(answer["prompt_logprobs"], ids, _reference(llama, ids), 0, chr)


@pytest.mark.parametrize("path,fields,quoted", [
    ("/v1/completions", {"prompt_logprobs": 2, "stream": True}, "without streaming"),
    ("/v1/chat/completions", {"prompt_logprobs": 0, "stream": True}, "without streaming"),
    ("/v1/completions", {"prompt_logprobs": 21}, "21"),
    ("/v1/completions", {"prompt_logprobs": -1}, "-1"),
    ("/v1/chat/completions", {"prompt_logprobs": "2"}, "'2'"),
])  # fmt: skip
def test_prompt_logprobs_it_cannot_answer_are_400s_naming_the_field(tiny_server, live_server, path, fields, quoted):
    body = {"model": "tiny", **({"prompt": "hi"} if "chat" not in path else {"messages": [{"role": "user", "content": "hi"}]})}
    with live_server(tiny_server) as url:
        message = assert_error(post_json(url, path, {**body, **fields}), 400, "prompt_logprobs")
    assert quoted in message
