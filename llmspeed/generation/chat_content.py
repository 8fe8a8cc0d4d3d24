"""Chat messages' ``content`` as the tokenizer's chat template takes it: a string, or OpenAI's list of parts.

OpenAI's API lets a message's content be a list of parts (``[{"type": "text", "text": "..."}]``). Most chat
templates (SmolLM2's, Llama's, Qwen's) write ``message['content']`` as a string: given parts, they fail or write the
list's Python repr. Some iterate over the parts (``{% for part in message['content'] %}``). As vLLM does, the
template's own text says which: a template that loops over a message's content (itself, or in a macro it passes the
content to, as Qwen3-VL's and GLM-4.5's do) takes the parts as given; any other gets each message's text parts
joined with ``"\\n"`` (:func:`content_text`, the OpenAI server's rule too). Either way a part that is not text is
refused: the models run on text only.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

ContentFormat = Literal["string", "openai"]


class ContentPartError(ValueError):
    """A content part that is not text; ``param`` names it as OpenAI's errors do (``messages.0.content.1.type``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def content_text(content: list[Any], role: str, param: str) -> str:
    """The text of a message's content ``parts``: each ``{"type": "text", "text": <a string>}`` (an assistant's
    ``{"type": "refusal", "refusal": <a string>}`` too, as vLLM reads it) joined with ``"\\n"``, as vLLM joins them.

    ``param`` names the content in errors (``messages.0.content``).

    Raises:
        ContentPartError: naming the first part that is not such a part, and its type.
    """
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        field = "refusal" if kind == "refusal" and role == "assistant" else "text"
        if not isinstance(part, dict) or kind != field:
            raise ContentPartError(f"{param}.{j}.type: only text content parts ({{'type': 'text', 'text': ...}}) and an "
                                   f"assistant's refusal parts are supported; got {kind!r}", f"{param}.{j}.type")
        if not isinstance(part.get(field), str):
            raise ContentPartError(f"{param}.{j}.{field}: a {field} part's {field} must be a string; got "
                                   f"{part.get(field)!r}", f"{param}.{j}.{field}")
        texts.append(part[field])
    return "\n".join(texts)  # "".join glued the parts' words together: ["Summarize:", "It..."]


def template_messages(tokenizer: Any, messages: list[Any], tools: list[Any] | None = None) -> list[Any]:
    """``messages`` as ``tokenizer``'s chat template takes them: content parts joined to text (new dicts; the
    caller's stay as they are) unless the template iterates over a message's content (:func:`content_format`;
    ``tools``: the ones the conversation is rendered with, which pick a named template); a ``tool`` turn's parts
    are joined either way, as vLLM joins them.

    Raises:
        ValueError: naming ``messages.{i}.content.{j}`` and its type, for a part that is not text (the models run on
            text only: an image part's placeholder would reach the model without its image).
    """
    form = content_format(tokenizer, tools) if any(isinstance(m.get("content"), list) for m in messages) else None
    if form is None:
        return messages
    try:
        texts = [content_text(m["content"], m.get("role"), f"messages.{i}.content")
                 if isinstance(m.get("content"), list) else None for i, m in enumerate(messages)]  # fmt: skip
    except ContentPartError as err:
        why = "writes each message's content as text, so only its text parts are taken (joined)" if form == "string" \
            else "renders the parts, and this engine runs on text only"  # fmt: skip
        raise ValueError(f"{err}: this model's chat template {why}") from None
    if form == "openai":  # but a tool result's text joined, as vLLM: templates that loop over a user's parts write
        # it as a string (Mistral's: message['content']|string wrote the list's repr)
        texts = [t if m.get("role") == "tool" else None for m, t in zip(messages, texts)]
    return [{**m, "content": t} if t is not None else m for m, t in zip(messages, texts)]


def content_format(tokenizer: Any, tools: list[Any] | None = None) -> ContentFormat | None:
    """``"openai"`` when ``tokenizer``'s chat template loops over a message's content (it renders parts), else
    ``"string"``; ``None`` when it has no template or one that is not Jinja text (its parts pass as given).

    Of named templates, the one ``apply_chat_template`` renders: ``"tool_use"`` (where there is one) when ``tools``
    are given, else ``"default"``."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # as transformers' get_chat_template picks
        template = template.get("tool_use" if tools is not None and "tool_use" in template else "default")
    return _detected(template) if isinstance(template, str) else None


@lru_cache(maxsize=32)
def _detected(template: str) -> ContentFormat | None:
    import jinja2
    import jinja2.nodes as nodes

    try:  # transformers' own environment knows its extensions ({% generation %}); plain Jinja is the fallback
        from transformers.utils.chat_template_utils import _compile_jinja_template

        tree = _compile_jinja_template(template).environment.parse(template)
    except Exception:
        try:
            tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"]).parse(template)
        except Exception:
            return None

    def base(node: Any) -> Any:  # through filters, tests and slices: messages|reverse, messages[1:]
        while isinstance(node, (nodes.Filter, nodes.Test)) or (
                isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)):  # fmt: skip
            node = node.node
        return node

    def key(node: Any) -> Any:  # x.key or x['key'] -> (x, key)
        if isinstance(node, nodes.Getattr):
            return node.node, node.attr
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            return node.node, node.arg.value
        return None, None

    lists, items, contents = {"messages"}, set[str](), set[str]()

    def kind(node: Any) -> str | None:
        node = base(node)
        if isinstance(node, nodes.Name):
            return "list" if node.name in lists else "item" if node.name in items else \
                "content" if node.name in contents else None  # fmt: skip
        if isinstance(node, nodes.Getitem) and not isinstance(node.arg, nodes.Const) and kind(node.node) == "list":
            return "item"  # messages[i] (range(messages|length)), messages[loop.index0], messages[-1]
        inner, k = key(node)
        inner_kind = kind(inner) if inner is not None else None
        if inner_kind == "list" and isinstance(k, int):  # messages[0]
            return "item"
        return "content" if inner_kind == "item" and k == "content" else None

    bindings = [(a.target, a.node, False) for a in tree.find_all(nodes.Assign)]
    bindings += [(f.target, f.iter, True) for f in tree.find_all(nodes.For)]
    macros = {m.name: m.args for m in tree.find_all(nodes.Macro)}  # a call binds its arguments to the parameters:
    for call in tree.find_all(nodes.Call):  # {% macro render(content) %}...{{ render(message['content']) }}
        params = macros.get(call.node.name, []) if isinstance(call.node, nodes.Name) else []
        bindings += list(zip(params, call.args, [False] * len(call.args)))
        bindings += [(p, kw.value, False) for kw in call.kwargs for p in params if p.name == kw.key]
    changed = True
    while changed:  # names bound to the messages, a message and a message's content, to a fixed point
        changed = False
        for target, value, loop in bindings:
            if not isinstance(target, nodes.Name):
                continue
            k = kind(value)
            named = {"list": items if loop else lists, "item": None if loop else items,
                     "content": None if loop else contents}.get(k or "")  # fmt: skip
            if named is not None and target.name not in named:
                named.add(target.name)
                changed = True
    return "openai" if any(kind(f.iter) == "content" for f in tree.find_all(nodes.For)) else "string"


__all__ = ["ContentFormat", "ContentPartError", "content_format", "content_text", "template_messages"]
