"""vLLM's chat template extensions on ``/v1/chat/completions``: ``continue_final_message`` (with
``add_generation_prompt: false``) continues the assistant's last message, ``echo`` puts that message's text before
the answer (streamed too: its own chunk first), ``chat_template_kwargs`` reach the template as variables; against the template rendered by transformers
and the generator run on its tokens."""

from __future__ import annotations

import pytest

from llmspeed import Generator, SamplingParams
from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer
from tests.serving.conftest import assert_error, openai_client, post_json

PREFILL = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "My favourite color is"}]


@pytest.mark.slow
def test_continue_final_message_echo_and_template_variables_on_smollm2(smollm2, live_server):
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template(PREFILL, add_generation_prompt=False, continue_final_message=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    want = Generator(smollm2, progress=False).generate_batched([list(ids)], SamplingParams(max_new_tokens=8))[0]
    body = {"model": "smollm2", "messages": PREFILL, "max_tokens": 8, "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True}  # fmt: skip
    with live_server(OpenAIServer(Engine(smollm2, kv_cache_tokens=2048), "smollm2")) as url:
        answer = post_json(url, "/v1/chat/completions", body).json()
        assert answer["choices"][0]["message"]["content"] == want.text
        assert answer["usage"]["prompt_tokens"] == len(ids)
        counted = post_json(url, "/tokenize", {"messages": PREFILL, "add_generation_prompt": False,
                                               "continue_final_message": True}).json()  # fmt: skip
        assert counted["tokens"] == list(ids)  # /tokenize takes the options too, as vLLM's
        echoed = post_json(url, "/v1/chat/completions", {**body, "echo": True}).json()
        assert echoed["choices"][0]["message"]["content"] == "My favourite color is" + want.text
        extra = {k: v for k, v in body.items() if k not in ("model", "messages", "max_tokens", "temperature")}
        chunks = openai_client(url).chat.completions.create(model="smollm2", messages=PREFILL, max_tokens=8, temperature=0,
                                                            stream=True, extra_body={**extra, "echo": True})  # fmt: skip
        contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert contents[0] == "My favourite color is" and "".join(contents) == "My favourite color is" + want.text
        # vLLM's rule: the last message is echoed when it is the assistant's (the role being written); a user's is not
        after_user = post_json(url, "/v1/chat/completions", {**body, "messages": PREFILL[:1], "echo": True,
                                                             "add_generation_prompt": True,
                                                             "continue_final_message": False}).json()  # fmt: skip
        assert not after_user["choices"][0]["message"]["content"].startswith("Name a color.")
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if shout %}LOUDLY: {% endif %}"
        plain = post_json(url, "/v1/chat/completions", {"model": "smollm2", "messages": PREFILL[:1], "max_tokens": 1})
        loud = post_json(url, "/v1/chat/completions", {"model": "smollm2", "messages": PREFILL[:1], "max_tokens": 1,
                                                       "chat_template_kwargs": {"shout": True}})  # fmt: skip
        extra = len(tok("LOUDLY: ", add_special_tokens=False)["input_ids"])
        assert loud.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"] + extra


def test_bad_template_options_are_named(tiny_server, live_server):
    ask = {"model": "tiny", "messages": PREFILL, "max_tokens": 2}
    with live_server(tiny_server) as url:
        for body, param in [
            ({**ask, "continue_final_message": True}, "continue_final_message"),  # add_generation_prompt still true
            ({**ask, "messages": PREFILL[:1], "continue_final_message": True, "add_generation_prompt": False},
             "messages.0.role"),
            ({**ask, "chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs.tokenize"),
            # the byte tokenizer's own apply_chat_template takes no such option: refused, not dropped
            ({**ask, "chat_template_kwargs": {"enable_thinking": False}}, "add_generation_prompt"),
        ]:
            assert_error(post_json(url, "/v1/chat/completions", body), 400, param)
        assert_error(post_json(url, "/tokenize", {"prompt": "hi", "continue_final_message": True}), 400,
                     "continue_final_message")  # fmt: skip
        assert post_json(url, "/v1/chat/completions", ask).status_code == 200
