"""vLLM's ``include_stop_str_in_output``, ``stop_reason``, ``allowed_token_ids`` and ``bad_words``: the bans against
transformers' own logits processors, the stop options against the output they cut."""

from __future__ import annotations

import pytest
import torch

from llmspeed import Generator, SamplingParams
from llmspeed.generation.admission import spellings
from tests.generation.conftest import CharTokenizer

PROMPT = [72, 101, 108, 108, 111]  # "Hello"


def _generate(model, tokenizer=None, prompt=PROMPT, **params):
    model.tokenizer = tokenizer
    gen = Generator(model, progress=False, eos_token_ids=[])
    return gen.generate_batched([prompt], SamplingParams(max_new_tokens=24, **params))[0]


def _hf(model, n: int, **kwargs) -> list[int]:
    with torch.inference_mode():
        out = model.hf.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                pad_token_id=0, **kwargs)  # fmt: skip
    return out[0, len(PROMPT):].tolist()


def test_bad_words_ban_what_transformers_no_bad_words_processor_bans(llama):
    plain = _generate(llama, CharTokenizer())
    a, b = plain.token_ids[3], plain.token_ids[4]  # a two-token word the model writes
    word = bytes([a, b]).decode("latin-1")
    got = _generate(llama, CharTokenizer(), bad_words=[word])
    want = _hf(llama, 24, bad_words_ids=[list(w) for w in spellings((word,), CharTokenizer())])
    assert got.token_ids == want and got.token_ids != plain.token_ids
    assert word not in got.text


def test_allowed_token_ids_match_transformers_suppressing_every_other_token(llama):
    plain = _generate(llama)
    allowed = sorted({*plain.token_ids[4:8], 3, 200})
    got = _generate(llama, allowed_token_ids=allowed)
    want = _hf(llama, 24, suppress_tokens=[t for t in range(256) if t not in allowed])
    assert got.token_ids == want and set(got.token_ids) <= set(allowed) and got.token_ids != plain.token_ids
    sampled = _generate(llama, allowed_token_ids=allowed, temperature=1.5, seed=3)
    assert set(sampled.token_ids) <= set(allowed)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_and_its_stop_reason(llama, include):
    text = _generate(llama, CharTokenizer()).text
    stop = text[5:7]
    at = text.find(stop)
    out = _generate(llama, CharTokenizer(), stop=["\x00never", stop], include_stop_str_in_output=include)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: at + len(stop) if include else at]
    model = llama
    model.tokenizer = CharTokenizer()
    gen = Generator(model, progress=False, eos_token_ids=[])
    events = list(gen.stream([PROMPT], SamplingParams(max_new_tokens=24, stop=[stop], include_stop_str_in_output=include)))
    assert "".join(e.text for e in events) == out.text  # the stream shows what the output keeps, no more


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_token_and_its_stop_reason(llama, include):
    plain = _generate(llama, CharTokenizer())
    token = plain.token_ids[6]
    at = plain.token_ids.index(token)
    out = _generate(llama, CharTokenizer(), stop_token_ids=[token], include_stop_str_in_output=include)
    assert out.token_ids == plain.token_ids[: at + 1] and out.stop_reason == token  # the id is kept either way
    assert out.text == CharTokenizer().decode(plain.token_ids[: at + 1 if include else at])


def test_end_of_sequence_and_length_have_no_stop_reason(llama):
    plain = _generate(llama)
    llama.tokenizer = None
    eos = plain.token_ids[2]
    out = Generator(llama, progress=False, eos_token_ids=[eos]).generate_batched(
        [PROMPT], SamplingParams(max_new_tokens=24, include_stop_str_in_output=True))[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert plain.finish_reason == "length" and plain.stop_reason is None


@pytest.mark.parametrize("kwargs, match", [
    ({"allowed_token_ids": []}, "`allowed_token_ids` must be None .* non-empty"),
    ({"allowed_token_ids": [1, -2]}, "`allowed_token_ids`.*got \\[1, -2\\]"),
    ({"allowed_token_ids": 5}, "`allowed_token_ids`"),
    ({"bad_words": [""]}, "`bad_words` must be a list of words"),
    ({"bad_words": ["ok", 3]}, "`bad_words`.*got \\['ok', 3\\]"),
    ({"include_stop_str_in_output": "yes"}, "`include_stop_str_in_output` must be a bool; got 'yes'"),
])  # fmt: skip
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
    assert SamplingParams(bad_words="word").bad_words == ("word",)
    assert SamplingParams(allowed_token_ids=[5, 2, 5]).allowed_token_ids == (2, 5)


def test_ids_past_the_vocabulary_and_bad_words_without_a_tokenizer_end_that_request_only(llama):
    llama.tokenizer = None
    gen = Generator(llama, progress=False)
    outs = gen.generate_batched([PROMPT] * 3, [SamplingParams(max_new_tokens=4, allowed_token_ids=[3, 256]),
                                              SamplingParams(max_new_tokens=4, bad_words=["no"]),
                                              SamplingParams(max_new_tokens=4)])  # fmt: skip
    assert [o.finish_reason for o in outs] == ["error", "error", "length"]
    assert "allowed_token_ids must be below the vocabulary size 256; got [256]" in outs[0].error
    assert "bad_words ['no'] need the model's tokenizer" in outs[1].error


@pytest.mark.slow
def test_skip_special_tokens_false_keeps_their_text_as_decode_does(smollm2_cached):
    model = smollm2_cached
    tok = model.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    chat = [[{"role": "user", "content": "Say hi."}]]
    gen = Generator(model, progress=False)
    forced = dict(max_new_tokens=3, ignore_eos=True, logit_bias={end: 100.0})
    kept = gen.generate_batched(chat, SamplingParams(**forced, skip_special_tokens=False))[0]
    assert kept.token_ids == [end] * 3 and kept.text == "<|im_end|>" * 3
    assert gen.generate_batched(chat, SamplingParams(**forced))[0].text == ""  # the default leaves them out
    free = SamplingParams(max_new_tokens=40, ignore_eos=True, skip_special_tokens=False)  # runs past its end of turn
    events = list(gen.stream(chat, free))
    out = events[-1].output
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=False) and "<|im_end|>" in out.text
    assert "".join(e.text for e in events) == out.text
