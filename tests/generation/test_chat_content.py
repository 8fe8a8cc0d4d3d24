"""Chat messages whose content is OpenAI's list of parts (llmspeed.generation.chat_content): joined to text for a
template that writes content as a string, passed as given to one that iterates over the parts."""

from __future__ import annotations

import pytest

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation.chat_content import ContentPartError, content_format, content_text, template_messages
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


LOOP = "{% for m in messages %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endfor %}"
SHAPES = [  # (template, the format vLLM's detection gives it): the shapes real models' templates take
    ("{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
     "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{% endfor %}", "openai"),  # Gemma 3, Mistral
    ("{% for message in messages %}{% for c in message.content %}{{ c.text }}{% endfor %}{% endfor %}", "openai"),
    ("{% for message in messages %}{{ message.content }}{% endfor %}", "string"),
    ("{% set loop_messages = messages[1:] %}{% for message in loop_messages %}"
     "{% for c in message['content'] %}{{ c.text }}{% endfor %}{% endfor %}", "openai"),  # a system turn taken out
    ("{% for message in messages[::-1] %}{% for c in message.content %}{{ c.text }}{% endfor %}{% endfor %}", "openai"),
    ("{% for message in messages %}{% for c in message['content'] | sort(attribute='type') %}{{ c.text }}{% endfor %}"
     "{% endfor %}", "openai"),  # Llama 4
    ("{% for message in messages %}{% set content = message['content'] | trim %}{{ content }}{% endfor %}", "string"),
    ("{% for message in messages %}{% set content = message['content'] %}{% for c in content %}{{ c.text }}"
     "{% endfor %}{% endfor %}", "openai"),  # bound after the loop that binds message: found on a second pass
    ("{% set ns = namespace(found=false) %}{% for message in messages %}{% if loop.first %}{% set ns.found = true %}"
     "{% endif %}{{ message['content'] }}{% endfor %}", "string"),
    ("{% for c in messages[0]['content'] %}{{ c.text }}{% endfor %}", "openai"),
    ("{% set first = messages[0] %}{% for c in first['content'] %}{{ c.text }}{% endfor %}", "openai"),
    ("{% for message in messages %}{{ message['content'] }}{% for call in message['tool_calls'] %}{{ call }}{% endfor %}"
     "{% endfor %}", "string"),
    ("{% for tool in tools %}{% for c in tool['content'] %}{{ c }}{% endfor %}{% endfor %}", "string"),
    ("{% for message in messages %}{% generation %}{{ message['content'] }}{% endgeneration %}{% endfor %}", "string"),
    ("{% for message in messages %}{% generation %}{% for c in message.content %}{{ c.text }}{% endfor %}"
     "{% endgeneration %}{% endfor %}", "openai"),  # transformers' {% generation %}, which plain Jinja cannot parse
    (QWEN_MACRO := "{% macro render_content(content, do_vision_count, is_system_content=false) %}{% if content is string %}"
     "{{ content }}{% else %}{% for item in content %}{% if 'text' in item %}{{ item.text }}{% endif %}{% endfor %}"
     "{% endif %}{% endmacro %}{% for message in messages %}{% set content = render_content(message.content, true)|trim %}"
     "{{ content }}{% endfor %}", "openai"),  # Qwen3-VL, Qwen3.5: the parts looped over in a macro
    ("{% macro visible_text(content) %}{% if content is string %}{{ content }}{% elif content is iterable %}"
     "{% for item in content %}{{ item.text }}{% endfor %}{% endif %}{% endmacro %}{% for m in messages %}"
     "{{ visible_text(content=m.content) }}{% endfor %}", "openai"),  # GLM-4.5, MiniMax (by keyword here)
    ("{% macro render_tools(tool_list) %}{% for tool in tool_list %}{{ tool.name }}{% endfor %}{% endmacro %}"
     "{{ render_tools(tools) }}{% for m in messages %}{{ m.content }}{% endfor %}", "string"),  # MiniMax's tools
]


@pytest.mark.parametrize("template,expected", SHAPES, ids=[
    "is-string-else-loop", "attribute", "attribute-string", "sliced", "reversed", "filtered", "set-trim",
    "set-then-loop", "namespace", "first-message", "set-first-message", "tool-calls-loop", "tools-loop", "generation-string",
    "generation-loop", "content-macro", "content-macro-keyword", "tools-macro"])  # fmt: skip
def test_the_content_format_of_real_template_shapes_is_vllms(template, expected):
    tok = ChatTokenizer()
    tok.chat_template = template
    assert content_format(tok) == expected
    tok.chat_template = {"default": template, "rag": LOOP}  # named templates: apply_chat_template renders "default"
    assert content_format(tok) == expected
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert template_messages(tok, parts) == (parts if expected == "openai" else [{"role": "user", "content": "a\nb"}])


@pytest.mark.parametrize("template", [
    "{% macro render(content) %}{% for part in content %}{{ part.text }}{% endfor %}{% endmacro %}"
    "{% for message in messages %}[{{ render(message['content']) }}]{% endfor %}",
    "{% macro turn(message) %}[{% for c in message['content'] %}{{ c.text }}{% endfor %}]{% endmacro %}"
    "{% for m in messages %}{{ turn(m) }}{% endfor %}",
], ids=["content-macro", "message-macro"])  # fmt: skip
def test_a_template_that_loops_over_the_parts_in_a_macro_renders_their_text(template):
    """Regression: a template that passes a message's content (or the message) to a macro looping over the content (as
    Qwen3-VL's, Qwen3.5's, GLM-4.5's, Gemma 4's do) was read as one that writes content as a string: it got the text
    joined, and a macro without a string branch iterated its characters, whose ``text`` is empty: the message vanished
    from the prompt."""
    import jinja2

    tok = ChatTokenizer()
    tok.chat_template = template
    got = template_messages(tok, PARTS[1:])
    assert got == PARTS[1:] and jinja2.Template(template).render(messages=got) == "[Summarize:It rains.]"


def test_a_template_that_is_not_jinja_text_gets_the_parts_as_given():
    tok = ChatTokenizer()
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    for template in ("{% for m in messages %}", None, {"tool_use": LOOP}):  # unparsable, none, no "default"
        tok.chat_template = template
        assert content_format(tok) is None and template_messages(tok, parts) is parts


def test_a_refusal_part_is_an_assistants_text_and_must_be_a_string():
    refusal = [{"type": "refusal", "refusal": "No."}, {"type": "text", "text": "Sorry."}]
    assert content_text(refusal, "assistant", "messages.1.content") == "No.\nSorry."
    with pytest.raises(ContentPartError, match="'refusal'") as err:
        content_text(refusal, "user", "messages.0.content")
    assert err.value.param == "messages.0.content.0.type"
    with pytest.raises(ContentPartError, match="must be a string") as err:
        content_text([{"type": "refusal", "refusal": None}], "assistant", "messages.1.content")
    assert err.value.param == "messages.1.content.0.refusal"


def test_a_part_that_is_not_text_is_refused_by_a_template_that_takes_parts_too(llama):
    """Regression: a template that loops over the parts got them as given, an image part too: a Gemma 3-like
    template wrote its placeholder and the text-only model ran without the image, silently."""
    llama.tokenizer = PartsTokenizer()
    chat = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match="only text") as err:
        prompt_ids(chat, llama.tokenizer, False, llama.spec.vocab_size)
    assert "messages.0.content.1.type" in str(err.value) and "'image_url'" in str(err.value)
    out = Generator(llama, progress=False).generate_batched([chat, "fine"], SamplingParams(max_new_tokens=2))
    assert out[0].finish_reason == "error" and "messages.0.content.1.type" in out[0].error
    assert out[1].finish_reason != "error" and chat[0]["content"][1]["type"] == "image_url"  # refused, not changed


@pytest.mark.parametrize("template", [
    "{% for i in range(messages|length) %}{% set message = messages[i] %}{% for c in message['content'] %}{{ c.text }}"
    "{% endfor %}{% endfor %}",
    "{% for m in messages %}{% for c in messages[loop.index0]['content'] %}{{ c.text }}{% endfor %}{% endfor %}",
    "{% for c in messages[-1]['content'] %}{{ c.text }}{% endfor %}",
], ids=["range-index", "loop-index", "last"])  # fmt: skip
def test_a_message_taken_by_a_computed_index_is_a_message(template):
    """Regression: only ``messages[<a constant>]`` was read as a message, so a template that takes each one as
    ``messages[i]`` (``range(messages|length)``, as some templates walk a conversation) and loops over its content
    got the text joined, and iterated its characters: every part's ``text`` was empty."""
    tok = ChatTokenizer()
    tok.chat_template = template
    assert content_format(tok) == "openai"


MISTRAL = (  # Mistral's current templates (Devstral, Magistral): a user's parts looped over, a tool result a string
    "{% for m in messages %}{% if m['role'] == 'tool' %}[TOOL_RESULTS]{{ m['content']|string }}[/TOOL_RESULTS]"
    "{% elif m['content'] is string %}[INST]{{ m['content'] }}[/INST]{% else %}[INST]{% for block in m['content'] %}"
    "{{ block['text'] }}{% endfor %}[/INST]{% endif %}{% endfor %}"
)


def test_a_tool_results_parts_are_joined_for_a_template_that_takes_a_users_parts():
    """Regression: for a template that loops over a user's parts, a ``tool`` turn's parts (as clients send tool
    results) went as given too, and Mistral's template, which writes a tool result as a string, wrote the list's
    Python repr into the prompt. vLLM joins a tool turn's text parts for this."""
    import jinja2

    tok = ChatTokenizer()
    tok.chat_template = MISTRAL
    user = {"role": "user", "content": [{"type": "text", "text": "Weather?"}]}
    tool = {"role": "tool", "content": [{"type": "text", "text": "sunny"}, {"type": "text", "text": "20C"}],
            "tool_call_id": "c1"}  # fmt: skip
    got = template_messages(tok, [user, tool])
    assert got == [user, {**tool, "content": "sunny\n20C"}] and tool["content"][0] == {"type": "text", "text": "sunny"}
    assert jinja2.Template(MISTRAL).render(messages=got) == "[INST]Weather?[/INST][TOOL_RESULTS]sunny\n20C[/TOOL_RESULTS]"
