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


def test_a_2d_tensor_or_array_prompt_is_refused_naming_its_shape(llama):
    """Regression: a ``[1, n]`` batch as one prompt (transformers' ``input_ids``) failed with "token ids must be
    integers; got tensor([1, 2, 3])", its row read as a token; now the error names the shape and the fix."""
    import numpy as np
    import torch

    gen = Generator(llama, progress=False)
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    outs = gen.generate_batched([torch.tensor([[1, 2, 3]]), np.array([[1, 2, 3]]), torch.tensor([1, 2, 3])], sp)
    for out, kind in zip(outs[:2], ("Tensor", "ndarray")):
        assert out.finish_reason == "error" and out.token_ids == []
        assert f"must be 1-D; got a {kind} of shape (1, 3)" in out.error and "input_ids[0]" in out.error
    assert outs[2].finish_reason == "length" and outs[2].prompt_token_ids == [1, 2, 3]
