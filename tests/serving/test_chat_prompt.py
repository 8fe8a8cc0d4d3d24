"""Message fields reach the chat template; tool fields a template drops (or cannot render) are a 400 naming them."""

from __future__ import annotations

import threading

import httpx
import pytest

from llmspeed.serving import Engine
from llmspeed.serving.api_errors import APIError
from llmspeed.serving.chat_prompt import chat_prompt
from llmspeed.serving.server import OpenAIServer
from tests.generation.test_engine import CharTokenizer

openai = pytest.importorskip("openai")

HI = {"role": "user", "content": "hi"}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
ROUND_TRIP = [HI, {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "content": "42", "tool_call_id": "c1"}]


class ToolTokenizer(CharTokenizer):
    """A byte-level tokenizer whose template writes the tools and every message's role, name, content and tool
    calls; it leaves out what ``drops`` names ("tools", "tool_calls", "tool" turns), as a template that does not
    know them does, and fails on a "tool" turn with ``fails``. It keeps the messages it was handed."""

    chat_template = "(a Python template)"

    def __init__(self, drops: tuple[str, ...] = (), fails: bool = False):
        self.drops, self.fails, self.seen = drops, fails, []

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, tokenize=True):
        self.seen.append(messages)
        text = "".join(f"<{t['function']['name']}>" for t in tools or [] if "tools" not in self.drops)
        for m in messages:
            if m["role"] == "tool" and self.fails:
                raise ValueError("roles must alternate user/assistant")
            if m["role"] in self.drops:
                continue
            calls = [] if "tool_calls" in self.drops else m.get("tool_calls", [])
            name = f"({m['name']})" if "name" in m else ""
            text += f"{m['role']}{name}:{m['content']}" + "".join(f"[{c['function']['name']}]" for c in calls) + "\n"
        return self.encode(text) if tokenize else text


def _server(llama, tokenizer):
    llama.tokenizer = tokenizer
    return OpenAIServer(Engine(llama, kv_cache_tokens=4096), "tiny")


def _chat(url, **fields):
    body = {"model": "tiny", "max_tokens": 2, "min_tokens": 2, **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


RENDERED = [  # (request fields, the prompt the template writes)
    ({"messages": [{**HI, "name": "bob", "x-extra": 1}]}, "user(bob):hi\n"),
    ({"messages": [{"role": "developer", "content": "be brief"}, HI]}, "system:be brief\nuser:hi\n"),
    ({"messages": [HI], "tools": [TOOL], "tool_choice": "none"}, "<f>user:hi\n"),
    ({"messages": ROUND_TRIP}, "user:hi\nassistant:[f]\ntool:42\n"),
    ({"messages": ROUND_TRIP, "tools": [TOOL], "tool_choice": "none", "stream": True}, "<f>user:hi\nassistant:[f]\ntool:42\n"),
]


@pytest.mark.parametrize("fields,prompt", RENDERED, ids=["name", "developer-as-system", "tools", "tool-round-trip", "tools-streamed"])
def test_message_fields_and_tools_reach_the_chat_template(llama, live_server, fields, prompt):
    tokenizer = ToolTokenizer()
    with live_server(_server(llama, tokenizer)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        kw = {k: v for k, v in fields.items() if k != "stream"}
        if fields.get("stream"):
            chunks = list(client.chat.completions.create(model="tiny", max_tokens=2, stream=True, extra_body={"min_tokens": 2},
                                                          stream_options={"include_usage": True}, **kw))
            used = chunks[-1].usage
        else:
            used = client.chat.completions.create(model="tiny", max_tokens=2, extra_body={"min_tokens": 2}, **kw).usage
        assert used.prompt_tokens == len(prompt) and used.completion_tokens == 2
    if "name" in fields["messages"][0]:
        assert tokenizer.seen[-1] == [{"role": "user", "content": "hi", "name": "bob", "x-extra": 1}]


def test_content_parts_reach_the_template_joined_with_newlines_as_vllm_joins_them(llama, live_server):
    """Regression: text parts were joined with "": ["Summarize:", "It rained."] reached the model as
    "Summarize:It rained.", the parts' words glued together; vLLM (and TensorRT-LLM) join them with "\\n"."""
    tokenizer = ToolTokenizer()
    parts = [{"type": "text", "text": "Summarize:"}, {"type": "text", "text": "It rained."}]
    with live_server(_server(llama, tokenizer)) as url:
        r = _chat(url, messages=[{"role": "user", "content": parts}])
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len("user:Summarize:\nIt rained.\n")
    assert tokenizer.seen[-1] == [{"role": "user", "content": "Summarize:\nIt rained."}]


def test_an_assistant_refusal_part_is_read_as_its_text_as_vllm_reads_it(llama, live_server):
    """Regression: an assistant turn sent back with OpenAI's ``{"type": "refusal", "refusal": ...}`` part (how the API
    returns a model's refusal) was a 400; vLLM takes its text. A user's refusal part is still refused."""
    tokenizer = ToolTokenizer()
    refused = [{"type": "refusal", "refusal": "I cannot."}]
    with live_server(_server(llama, tokenizer)) as url:
        r = _chat(url, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": refused},
                                 {"role": "user", "content": "why?"}])  # fmt: skip
        assert r.status_code == 200, r.text
        assert tokenizer.seen[-1][1] == {"role": "assistant", "content": "I cannot."}
        r = _chat(url, messages=[{"role": "user", "content": refused}])
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.0.type"


TOJSON_TEMPLATE = (  # writes a tool call's arguments with | tojson, as transformers' tool-use templates do
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_tool_call_arguments_reach_the_template_as_the_object_they_encode(llama, live_server):
    """Regression: OpenAI's tool call ``arguments`` (JSON text) reached the template as a string, so a template
    writing ``arguments | tojson`` (transformers' convention, which takes them as an object) wrote them quoted and
    escaped, ``"{\\"city\\": \\"Paris\\"}"``: not the prompt transformers renders for the conversation. vLLM parses
    them; text that is not a JSON object stays as given."""
    from tests.serving.test_openai_contract import _byte_level_tokenizer

    tokenizer = _byte_level_tokenizer()
    tokenizer.chat_template = TOJSON_TEMPLATE

    def call(arguments):
        return {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": arguments}}

    def turns(arguments):
        return [HI, {"role": "assistant", "content": "", "tool_calls": [call(arguments)]},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]

    sent = turns('{"city": "Paris"}')
    golden = tokenizer.apply_chat_template(turns({"city": "Paris"}), add_generation_prompt=True, tokenize=False)
    assert '<call>weather {"city": "Paris"}</call>' in golden
    with live_server(_server(llama, tokenizer)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        used = client.chat.completions.create(model="tiny", messages=sent, max_tokens=2).usage
    assert used.prompt_tokens == len(tokenizer.encode(golden, add_special_tokens=False))
    assert chat_prompt(tokenizer, sent)[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the caller's are untouched
    for text in ("not json", "[1, 2]"):  # not an object: as given
        assert chat_prompt(tokenizer, turns(text))[1]["tool_calls"][0]["function"]["arguments"] == text


def test_an_empty_tool_calls_list_is_left_out_as_vllm_does(llama, live_server):
    """Regression: ``"tool_calls": []`` (as vLLM's answers carry it, replayed by a client) reached the template, and a
    template that checks ``'tool_calls' in message`` (Llama 3.1's: exactly one call) refused the conversation: a 400
    for a turn without any tool call. vLLM leaves an empty list out."""
    from tests.serving.test_openai_contract import _byte_level_tokenizer

    tokenizer = _byte_level_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if 'tool_calls' in m and m.tool_calls | length != 1 %}"
        "{{ raise_exception('one tool call per turn') }}{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    )
    turns = [HI, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "go on"}]
    golden = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    with live_server(_server(llama, tokenizer)) as url:
        r = _chat(url, messages=[turns[0], {**turns[1], "tool_calls": []}, turns[2]])
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(golden)


REFUSED = [  # (template, request fields, param)
    ({"drops": ("tools",)}, {"messages": [HI], "tools": [TOOL], "tool_choice": "none"}, "tools"),
    ({"drops": ("tool_calls",)}, {"messages": ROUND_TRIP}, "messages.1.tool_calls"),
    ({"drops": ("tool",)}, {"messages": ROUND_TRIP}, "messages.2.role"),
    ({"fails": True}, {"messages": ROUND_TRIP}, "messages.2.role"),
    ({}, {"messages": [HI], "tools": [TOOL]}, "tool_choice"),
    ({}, {"messages": [HI], "tools": [TOOL], "tool_choice": "auto"}, "tool_choice"),
    ({}, {"messages": [HI], "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({}, {"messages": [HI], "tools": [TOOL], "tool_choice": {"type": "function", "name": "f"}}, "tool_choice"),
    ({}, {"messages": [HI], "tool_choice": "none"}, "tool_choice"),
    ({}, {"messages": [HI], "tools": [{"type": "function", "function": {}}], "tool_choice": "none"}, "tools.0.function.name"),
    ({}, {"messages": [HI], "tools": [{"type": "code", "function": {"name": "f"}}], "tool_choice": "none"}, "tools.0.type"),
    ({}, {"messages": [{**HI, "name": 5}]}, "messages.0.name"),
    ({}, {"messages": [HI, {"role": "assistant", "tool_calls": "f"}]}, "messages.1.tool_calls"),
]


@pytest.mark.parametrize("template,fields,param", REFUSED, ids=[f"{c[2]}-{i}" for i, c in enumerate(REFUSED)])
def test_tool_fields_the_template_drops_or_cannot_render_are_a_400_naming_them(llama, live_server, template, fields, param):
    with live_server(_server(llama, ToolTokenizer(**template))) as url:
        r = _chat(url, **fields)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        if template.get("fails"):
            assert "roles must alternate" in error["message"]
        assert _chat(url, messages=[HI]).status_code == 200


@pytest.mark.slow
def test_what_smollm2s_template_renders(smollm2_cached):
    """SmolLM2's template writes each message's role and content: a ``tool`` turn renders (as the role "tool"), a
    ``name`` is handed over but not written, and ``tools`` and ``tool_calls`` are not written at all."""
    tok = smollm2_cached.tokenizer
    named = [{**HI, "name": "bob"}]
    assert chat_prompt(tok, named) == named  # handed to the template as given
    assert tok.apply_chat_template(named, tokenize=False) == tok.apply_chat_template([HI], tokenize=False)
    turns = [HI, {"role": "assistant", "content": "calling f"}, {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    assert chat_prompt(tok, turns) == turns
    assert "<|im_start|>tool\n42<|im_end|>" in tok.apply_chat_template(turns, tokenize=False)
    calls = [HI, {"role": "assistant", "content": "", "tool_calls": [CALL]}, turns[2]]
    for messages, tools, param in ((calls, None, "messages.1.tool_calls"), ([HI], [TOOL], "tools")):
        with pytest.raises(APIError) as err:
            chat_prompt(tok, messages, tools)
        assert err.value.status == 400 and err.value.param == param


class GatedToolTokenizer(ToolTokenizer):
    """A ToolTokenizer whose rendering with ``tools`` waits (at most 10 s) until ``gate`` is set; ``entered`` is set
    when a rendering starts waiting."""

    def __init__(self):
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, tokenize=True):
        if tools is not None:
            self.entered.set()
            self.gate.wait(10)
        return super().apply_chat_template(messages, tools, add_generation_prompt, tokenize)


def test_rendering_a_tools_request_does_not_block_the_event_loop(llama, live_server):
    """Regression: chat_prompt rendered the template (several times for tool checks) on the event loop's thread,
    so a slow template stalled every other request, /health included, until it was done."""
    tokenizer = GatedToolTokenizer()
    with live_server(_server(llama, tokenizer)) as url:
        answers = []
        caller = threading.Thread(target=lambda: answers.append(
            _chat(url, messages=[HI], tools=[TOOL], tool_choice="none")))
        caller.start()
        try:
            assert tokenizer.entered.wait(30)
            assert httpx.get(f"{url}/health", timeout=3).json() == {"status": "ok"}  # timed out before the fix
            assert not answers  # the tools request is still rendering
        finally:
            tokenizer.gate.set()
            caller.join(60)
        assert answers[0].status_code == 200, answers[0].text
        assert answers[0].json()["usage"]["prompt_tokens"] == len("<f>user:hi\n")
