"""Content parts through the OpenAI server: a chat template that loops over a message's parts gets them as parts
(as vLLM hands them over), one that writes content as a string gets their text joined; parts that are not text are
a 400 either way (the engine takes text only)."""

from __future__ import annotations

import httpx
import pytest

from llmspeed.serving import Engine
from llmspeed.serving.server import OpenAIServer

PARTS_TEMPLATE = (  # loops over every message's parts, as llava's and other multimodal models' templates do
    "{% for t in tools or [] %}<{{ t.function.name }}>{% endfor %}"
    "{% for m in messages %}<{{ m.role }}>{% for part in m['content'] %}[{{ part['text'] }}]{% endfor %}{% endfor %}"
)
PARTS = [{"type": "text", "text": "Summarize:"}, {"type": "text", "text": "It rains."}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture
def parts_server(llama):
    from tests.serving.test_openai_contract import _byte_level_tokenizer

    tokenizer = _byte_level_tokenizer()
    tokenizer.chat_template = PARTS_TEMPLATE
    llama.tokenizer = tokenizer
    return OpenAIServer(Engine(llama, kv_cache_tokens=4096), "tiny")


def _chat(url, **fields):
    return httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, **fields}, timeout=60)


@pytest.mark.parametrize("tools", [None, [TOOL]], ids=["engine", "tools"])
def test_a_template_that_loops_over_parts_renders_the_parts_not_their_joined_text(parts_server, live_server, tools):
    """Regression: the server joined text parts into one string before the template, so a template that loops over
    ``message['content']`` iterated the string's characters: ``part['text']`` of each was empty, and the model saw
    ``<user>[][][]...`` in place of the user's words. vLLM hands such a template the parts."""
    tokenizer = parts_server.tokenizer
    extra = {"tools": tools, "tool_choice": "none"} if tools else {}
    messages = [{"role": "user", "content": PARTS}]
    golden = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert golden.endswith("<user>[Summarize:][It rains.]")
    with live_server(parts_server) as url:
        r = _chat(url, messages=messages, **extra)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(golden, add_special_tokens=False))
        refusal = [{"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}, *messages]
        r = _chat(url, messages=refusal, **extra)  # an assistant's refusal reaches it as the text part it reads as
        want = golden.replace("<user>", "<assistant>[No.]<user>")
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want), r.text
        image = [{"role": "user", "content": [PARTS[0], {"type": "image_url", "image_url": {"url": "x"}}]}]
        r = _chat(url, messages=image, **extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.1.type", r.text
        assert "image_url" in r.json()["error"]["message"]


def test_with_tools_the_parts_go_as_the_tool_use_template_takes_them(parts_server, live_server):
    """Regression: of named templates, the content format was read off "default" even for a request with tools, which
    transformers renders with "tool_use": parts were joined for a "tool_use" template that loops over them (and
    would be handed as a list to a string one)."""
    tokenizer = parts_server.tokenizer
    tokenizer.chat_template = {"default": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
                               "tool_use": PARTS_TEMPLATE}  # fmt: skip
    messages = [{"role": "user", "content": PARTS}]
    golden = tokenizer.apply_chat_template(messages, tools=[TOOL], add_generation_prompt=True, tokenize=False)
    assert golden == "<f><user>[Summarize:][It rains.]"
    with live_server(parts_server) as url:
        r = _chat(url, messages=messages, tools=[TOOL], tool_choice="none")
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(golden), r.text
        r = _chat(url, messages=messages)  # without tools: "default", which writes the text joined
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len("<user>Summarize:\nIt rains."), r.text
