"""Prompts to token ids (llmspeed.generation.prompts): what each kind of prompt becomes, and the errors of bad ones."""

from __future__ import annotations

import pytest

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


def test_a_lone_surrogate_is_refused_as_invalid_text_naming_where_not_as_a_template_error(llama):
    """Regression: a lone surrogate (``"\\ud83d"``, half an emoji, valid JSON) in a chat message failed with "the
    chat template cannot render this prompt ... chat messages look like [...]", blaming well-formed messages."""
    llama.tokenizer = ChatTokenizer()
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    chat = [{"role": "system", "content": "ok"}, {"role": "user", "content": "hi \ud83d"}]
    outs = Generator(llama, progress=False).generate_batched([chat, "a\udcffb", "fine"], sp)
    assert outs[0].finish_reason == outs[1].finish_reason == "error"
    assert "prompt[1]['content'] is not valid Unicode text" in outs[0].error and "at index 3" in outs[0].error
    assert "chat template" not in outs[0].error
    assert "prompt is not valid Unicode text" in outs[1].error and "'\\udcff' at index 1" in outs[1].error
    assert outs[2].finish_reason == "length"
    templated = Generator(llama, progress=False, chat_template=True).generate_batched(["\ud800"], sp)[0]
    assert "prompt is not valid Unicode text" in templated.error


def test_an_out_of_vocabulary_id_is_named_with_its_position(llama):
    """Regression: the error listed the prompt's first 8 ids ("got [1, 2, 3, 4, 5, 6, 7, 8]..."), all valid, not the
    one out of the vocabulary."""
    out = Generator(llama, progress=False).generate_batched([list(range(1, 20)) + [300, 5]])[0]
    assert out.finish_reason == "error" and "must be in [0, 256); got 300 at position 19 (of 21)" in out.error


def test_a_numpy_eos_id_in_the_generation_config_is_taken(llama):
    """Regression: a generation config's ``eos_token_id`` that is a NumPy integer crashed ``eos_ids`` (only ``int``
    and iterables were handled)."""
    import numpy as np

    from llmspeed.generation.prompts import eos_ids

    llama.hf.generation_config.eos_token_id = np.int64(7)
    assert 7 in eos_ids(llama)


def test_the_vocabulary_bound_is_exclusive():
    """The last id of the vocabulary is a token; ``vocab_size`` itself is not (mutation: ``<=`` took it)."""
    import pytest

    from llmspeed.generation.prompts import prompt_ids

    assert prompt_ids([0, 255], None, False, 256) == [0, 255]
    for bad, at in (([1, 256], 1), ([-1], 0)):
        with pytest.raises(ValueError, match=rf"must be in \[0, 256\); got {bad[at]} at position {at}"):
            prompt_ids(bad, None, False, 256)


def test_an_empty_list_is_an_empty_prompt_not_an_empty_chat(llama):
    """``[]`` is no chat (mutation: ``is_chat`` taking the empty list sent it to the chat template, which rendered
    a generation prompt and ran it, or to "this model has no tokenizer")."""
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for tokenizer in (None, CharTokenizer(), ChatTokenizer()):
        llama.tokenizer = tokenizer
        for out in Generator(llama, progress=False).generate_batched([[], ()], sp):
            assert out.finish_reason == "error" and out.error == "the prompt is empty; give at least one token"


def test_chat_prompts_end_with_the_assistant_turn_as_transformers_renders_them(smollm2_cached):
    """Chat messages (and strings under ``chat_template=True``) render as ``apply_chat_template(...,
    add_generation_prompt=True)`` does, so the model answers instead of continuing the user's turn (mutation:
    ``add_generation_prompt=False`` survived: the test tokenizer ignored it)."""
    from llmspeed.generation.prompts import prompt_ids

    tok = smollm2_cached.tokenizer
    chat = [{"role": "user", "content": "What is 2+2?"}]
    ids = prompt_ids(chat, tok, False, smollm2_cached.spec.vocab_size)
    want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == want and want.endswith("<|im_start|>assistant\n")
    assert prompt_ids("What is 2+2?", tok, True, smollm2_cached.spec.vocab_size) == ids


def test_one_token_tensors_are_prompts_not_token_ids_of_one_prompt(llama):
    """A list of 1-element 1-D tensors is that many one-token prompts (mutation: ``is_token_id`` without its ``ndim``
    check read each as a token id and refused the list as a single prompt's ids)."""
    import torch

    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    outs = Generator(llama, progress=False).generate_batched([torch.tensor([5]), torch.tensor([6])], sp)
    assert [o.prompt_token_ids for o in outs] == [[5], [6]] and {o.finish_reason for o in outs} == {"length"}


def test_a_single_chat_is_refused_as_prompts_not_run_per_message(llama):
    """A chat (a list of message dicts) given as ``prompts`` is one prompt, refused as a single string is, not run as
    one failing request per message."""
    gen = Generator(llama, progress=False)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for run in (gen.generate_batched, lambda p: list(gen.stream(p))):
        with pytest.raises(TypeError, match="single string, bytes or chat"):
            run(chat)
    assert gen.num_live == 0 and not gen.has_unfinished()
