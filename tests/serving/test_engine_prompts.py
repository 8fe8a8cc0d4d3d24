"""The serving Engine and its prompts: copied at submit (the caller may change its own afterwards), refused alone
when they cannot be rendered, encoded or read as token ids."""

from __future__ import annotations

import torch

import llmspeed
from llmspeed import SamplingParams
from tests.serving.conftest import _alone


def test_a_chat_prompt_the_template_cannot_render_ends_with_an_error_not_a_hang(llama):
    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    with llmspeed.Engine(llama) as engine:
        bad = engine.submit([{"role": "user"}], SamplingParams(max_new_tokens=2))
        good = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))
        out = bad.result(timeout=30)
        assert out.finish_reason == "error" and "chat template" in out.error
        assert good.result(timeout=30).finish_reason == "length"
        assert engine.loop_errors == 0


def test_a_prompt_the_tokenizer_cannot_encode_fails_alone_and_its_inbox_neighbours_run(llama, monkeypatch):
    """A lone surrogate ("\\ud800" is valid JSON) makes a Hugging Face fast tokenizer raise TypeError: that request
    ends with an error, and the requests queued in the same inbox batch still run (they used to hang with it)."""
    from tests.generation.test_engine import CharTokenizer

    class FastLikeTokenizer(CharTokenizer):
        def encode(self, text):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
                raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
            return super().encode(text)

    llama.tokenizer = FastLikeTokenizer()
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    with llmspeed.Engine(llama) as engine:
        with engine._cv:  # the engine thread takes all three in one inbox batch
            handles = [engine.submit(p, sp) for p in ("ab", "a\ud800", [1, 2, 3])]
        outs = [h.result(timeout=20) for h in handles]
        assert outs[1].finish_reason == "error" and "not valid Unicode" in outs[1].error and "ud800" in outs[1].error
        assert outs[0].finish_reason == outs[2].finish_reason == "length" and outs[0].prompt_token_ids == [97, 98]
        assert engine.loop_errors == 0
        real = engine.generator.add_request

        def broken(prompt, sampling=None, **kw):  # add_request raising anyway (a bug) fails its own request only
            if prompt == [7, 7]:
                raise RuntimeError("injected add fault")
            return real(prompt, sampling, **kw)

        monkeypatch.setattr(engine.generator, "add_request", broken)
        with engine._cv:
            handles = [engine.submit(p, sp) for p in ([7, 7], [1, 2, 3])]
        bad, good = (h.result(timeout=20) for h in handles)
        assert bad.finish_reason == "error" and "injected add fault" in bad.error
        assert good.token_ids == outs[2].token_ids and engine.loop_errors == 1
        assert engine.metrics()["requests_finished"] == 5  # the refused one counted too (/metrics missed it)


def test_boolean_token_ids_are_refused_not_read_as_0_and_1(llama):
    with llmspeed.Engine(llama) as engine:
        for prompt in ([True, 2], torch.tensor([True, False]), [1, torch.tensor(True)]):
            out = engine.submit(prompt, SamplingParams(max_new_tokens=2)).result(timeout=20)
            assert out.finish_reason == "error" and "must be integers" in out.error and "True" in out.error, prompt
        assert engine.submit([1, 2], SamplingParams(max_new_tokens=2)).result(timeout=20).prompt_token_ids == [1, 2]


def test_a_prompt_list_the_caller_reuses_after_submit_is_the_one_submitted(llama):
    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    expected = _alone(llama, [[1, 2, 3]], sp)[0]
    with llmspeed.Engine(llama) as engine:
        ids, messages = [1, 2, 3], [{"role": "user", "content": "hi"}]
        chat_ids = engine.submit(list(messages), sp).result(timeout=30).prompt_token_ids
        with engine._cv:  # the engine thread cannot take the inbox before the caller reuses its lists
            h = engine.submit(ids, sp)
            hc = engine.submit(messages, sp)
            ids[:] = [7, 8, 9, 10]
            messages[0]["content"] = "something else"
        out = h.result(timeout=30)
        assert out.prompt_token_ids == [1, 2, 3] and out.token_ids == expected
        assert hc.result(timeout=30).prompt_token_ids == chat_ids


def test_a_tuple_or_tensor_prompt_the_caller_changes_after_submit_is_the_one_submitted(llama):
    """Regression: only list prompts were copied at submit; a tensor changed in place, or a message dict in a tuple
    of messages, before the engine thread read it changed the running request."""
    import numpy as np

    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    expected = _alone(llama, [[1, 2, 3]], sp)[0]
    with llmspeed.Engine(llama) as engine:
        chat_ids = engine.submit([{"role": "user", "content": "hi"}], sp).result(timeout=30).prompt_token_ids
        tensor, array, messages = torch.tensor([1, 2, 3]), np.array([1, 2, 3]), ({"role": "user", "content": "hi"},)
        with engine._cv:  # the engine thread cannot take the inbox before the caller changes its prompts
            handles = [engine.submit(p, sp) for p in (tensor, tensor[:], array)]
            hc = engine.submit(messages, sp)
            tensor[:] = torch.tensor([7, 8, 9])
            array[:] = [7, 8, 9]
            messages[0]["content"] = "something else"
        for h in handles:
            out = h.result(timeout=30)
            assert out.prompt_token_ids == [1, 2, 3] and out.token_ids == expected
        assert hc.result(timeout=30).prompt_token_ids == chat_ids


def test_a_content_part_the_caller_changes_after_submit_is_the_one_submitted(llama):
    """Regression: message dicts were copied one level deep at submit, so a caller changing a content part (a
    nested dict) before the engine thread rendered the conversation changed the running request."""
    from tests.generation.test_engine import ChatTokenizer

    class PartsTokenizer(ChatTokenizer):  # renders OpenAI's content parts, [{"type": "text", "text": ...}]
        chat_template = "{% for m in messages %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endfor %}"

        def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
            return [b for m in messages for part in m["content"] for b in part["text"].encode("latin-1")]

    llama.tokenizer = PartsTokenizer()
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    with llmspeed.Engine(llama) as engine:
        messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        with engine._cv:  # the engine thread cannot take the inbox before the caller changes the part
            h = engine.submit(messages, sp)
            messages[0]["content"][0]["text"] = "something else"
        assert h.result(timeout=30).prompt_token_ids == list(b"hi")
