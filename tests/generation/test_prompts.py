"""Prompts to token ids (llmspeed.generation.prompts): what each kind of prompt becomes, and the errors of bad ones."""

from __future__ import annotations

from llmspeed import Generator, SamplingParams
from tests.generation.test_engine import CharTokenizer, ChatTokenizer


def test_chat_template_true_without_a_template_names_the_flag_not_a_message_list(llama):
    """Regression: a string prompt under ``chat_template=True`` to a tokenizer without a chat template failed with
    "prompt is a chat message list", which it is not."""
    llama.tokenizer = CharTokenizer()
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    text, chat = Generator(llama, progress=False, chat_template=True).generate_batched(
        ["hi", [{"role": "user", "content": "hi"}]], sp
    )
    assert text.finish_reason == "error" and "chat_template=True" in text.error and "chat message list" not in text.error
    assert chat.finish_reason == "error" and "chat message list" in chat.error
    llama.tokenizer = ChatTokenizer()
    assert Generator(llama, progress=False, chat_template=True).generate_batched(["hi"], sp)[0].prompt_token_ids == [104, 105]
