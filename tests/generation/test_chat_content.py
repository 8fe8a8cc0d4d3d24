"""Chat messages whose content is OpenAI's list of parts (llmspeed.generation.chat_content): joined to text for a
template that writes content as a string, passed as given to one that iterates over the parts."""

from __future__ import annotations

import pytest

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation.prompts import prompt_ids
from tests.generation.test_engine import ChatTokenizer

PARTS = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "Summarize:"}, {"type": "text", "text": "It rains."}]}]
TEXT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarize:\nIt rains."}]


class PartsTokenizer(ChatTokenizer):
    """A template that renders OpenAI's content parts (it loops over them), as some models' templates do."""

    chat_template = "{% for m in messages %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endfor %}"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [b for m in messages for part in m["content"] for b in part["text"].encode("latin-1")]


def test_text_parts_to_smollm2_render_as_the_same_text_in_a_string(smollm2_cached):
    """Regression: content parts reached SmolLM2's template (which writes ``message['content']`` as a string) as a
    list: it failed ("can only concatenate str (not "list") to str"); the server joined them, library callers
    did not."""
    tok, vocab = smollm2_cached.tokenizer, smollm2_cached.spec.vocab_size
    want = tok.apply_chat_template(TEXT, add_generation_prompt=True, tokenize=True)  # transformers' own, as text
    want = [int(t) for t in (want if isinstance(want, list) else want["input_ids"])]
    sent = [dict(m) for m in PARTS]
    assert prompt_ids(PARTS, tok, False, vocab) == want
    assert sent == PARTS  # the caller's messages are left as they were
    out = Generator(smollm2_cached, progress=False).generate_batched([PARTS], SamplingParams(max_new_tokens=1))[0]
    assert out.finish_reason != "error" and out.prompt_token_ids == want


def test_a_template_that_iterates_over_parts_gets_them_as_given(llama):
    llama.tokenizer = PartsTokenizer()
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    assert Generator(llama, progress=False).generate_batched([messages], sp)[0].prompt_token_ids == list(b"hi")
    with llmspeed.Engine(llama) as engine:
        assert engine.submit(messages, sp).result(timeout=30).prompt_token_ids == list(b"hi")


def test_a_string_template_joins_text_parts_through_the_engine_too(llama):
    llama.tokenizer = ChatTokenizer()  # writes message['content'] as a string
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    with llmspeed.Engine(llama) as engine:
        out = engine.submit([{"role": "user", "content": [{"type": "text", "text": "h"},
                                                           {"type": "text", "text": "i"}]}], sp).result(timeout=30)
    assert out.finish_reason == "length" and out.prompt_token_ids == list(b"h\ni")


@pytest.mark.parametrize("part,where,what", [
    ({"type": "image_url", "image_url": {"url": "x"}}, "messages.1.content.1.type", "'image_url'"),
    ({"type": "text", "text": None}, "messages.1.content.1.text", "None"),
    ("plain", "messages.1.content.1.type", "'str'"),
], ids=["image", "null-text", "not-a-dict"])
def test_a_part_that_is_not_text_is_refused_naming_messages_and_its_type(llama, part, where, what):
    llama.tokenizer = ChatTokenizer()
    chat = [{"role": "system", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "a"}, part]}]
    with pytest.raises(ValueError, match="only text|must be a string") as err:
        prompt_ids(chat, llama.tokenizer, False, llama.spec.vocab_size)
    assert where in str(err.value) and what in str(err.value) and "chat template" in str(err.value)
    out = Generator(llama, progress=False).generate_batched([chat, "fine"], SamplingParams(max_new_tokens=2))
    assert out[0].finish_reason == "error" and where in out[0].error and out[1].finish_reason != "error"
    assert chat[1]["content"][1] == part  # refused, not changed
