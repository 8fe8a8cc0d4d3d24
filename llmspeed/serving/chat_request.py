"""The chat completions request (``POST /v1/chat/completions``): its messages, tools, OpenAI's fields it takes and
ignores, and vLLM's chat template extensions (``add_generation_prompt``, ``continue_final_message``,
``chat_template_kwargs``, ``echo``); the fields it shares with completions are :class:`.openai_protocol.SamplingRequest`'s.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..generation.chat_content import ContentPartError, content_text
from ..names import shown as _shown
from .api_errors import APIError
from .openai_protocol import SamplingRequest
from .tool_choice import ToolChoiceError, forced_schema

# apply_chat_template's own arguments, which chat_template_kwargs may not set (the rest are template variables)
TEMPLATE_ARGUMENTS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                                "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                                "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


class ChatMessage(BaseModel):
    """One chat message (text content, or a list of text parts: joined with newlines for a chat template that writes
    content as a string, handed over as parts to one that loops over them, as vLLM does;
    :func:`~llmspeed.generation.chat_content.template_messages`).

    Its other fields (``name``, an assistant's ``tool_calls``, a tool turn's ``tool_call_id``, any other) go to the
    chat template as they are (a tool call's JSON ``arguments`` as the object they encode), as vLLM passes them;
    :mod:`.chat_prompt` refuses tool fields the template drops.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self, param: str = "content") -> str:
        """The message's text (text parts joined with ``"\\n"``, as vLLM's); ``param`` names its content in errors
        (``messages.0.content``).

        An assistant's ``{"type": "refusal", "refusal": <a string>}`` part (OpenAI's API sends the model's refusals
        back so) counts as text, as vLLM reads it.

        Raises:
            APIError: 400 for a part that is not ``{"type": "text", "text": <a string>}`` (or an assistant's refusal).
        """
        if isinstance(self.content, list):
            try:
                return content_text(self.content, self.role, param)
            except ContentPartError as err:
                raise APIError(400, str(err), err.param) from None
        return self.content or ""

    def template_content(self, param: str = "content") -> str | list[dict[str, Any]]:
        """The content as the engine takes it: its text, or its parts (checked as :meth:`text` checks them; an
        assistant's refusal part as the text part it reads as, as vLLM hands it over). The engine joins the parts
        for a chat template that writes content as a string and hands them to one that loops over them.

        Raises:
            APIError: 400 naming the part, as :meth:`text`.
        """
        text = self.text(param)
        if not isinstance(self.content, list):
            return text
        return [{"type": "text", "text": p["refusal"]} if p["type"] == "refusal" else p for p in self.content]


class ToolFunction(BaseModel):
    """The function a tool offers (``tools[i].function``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """One entry of ``tools``: a function the model may be shown through its chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: ToolFunction


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # false: the first call of an "auto" answer only (max_tool_calls)
    # OpenAI's fields that change nothing here, taken and ignored as vLLM takes them (a 400 broke clients that send
    # them): nothing is stored, every request runs alike; the rest is refused in check()
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    safety_identifier: str | None = None  # with prompt_cache_key, what OpenAI's API has in place of user
    prompt_cache_key: str | None = None
    # vLLM's template extensions: the answer continues the last (assistant) message instead of starting a new turn,
    # variables for the template (Qwen3's enable_thinking), and echo: the continued message's text before the answer
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False

    def template_options(self) -> dict[str, Any]:
        """What the chat template is called with beyond the messages and tools (``{}``: the defaults, which the engine
        renders itself): ``add_generation_prompt``, ``continue_final_message`` and ``chat_template_kwargs``."""
        if self.add_generation_prompt and not self.continue_final_message and not self.chat_template_kwargs:
            return {}
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message, **(self.chat_template_kwargs or {})}  # fmt: skip

    def echoed(self) -> str:
        """With ``echo``, the text the answer continues (the last message's, when it is the assistant's), else ``""``."""
        last = self.messages[-1]
        if not self.echo or last.role != "assistant":
            return ""
        content = last.template_content(f"messages.{len(self.messages) - 1}.content")
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content or [])

    def max_tokens_given(self) -> tuple[str, int | None]:
        """``max_completion_tokens`` when given (it is the one used, as vLLM), else ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return super().max_tokens_given()

    def check(self) -> None:
        """Refuse combinations of fields that each are valid alone, messages without their content, and a
        ``tool_choice`` that names no tool (``"auto"`` needs the server's tool-call parser: the server checks it)."""
        super().check()
        if self.store:
            raise APIError(400, "store: true asks to keep the completion for later retrieval, which this server does not "
                                "do; send store: false or leave it out", "store")
        if self.modalities is not None and self.modalities != ["text"]:
            raise APIError(400, f"modalities: this server answers with text only, ['text']; got {_shown(self.modalities)}",
                           "modalities")
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":  # only an assistant turn (a tool call) may have none
                raise APIError(400, f"messages.{i}.content is required in a {m.role!r} message; got none (null or missing)",
                               f"messages.{i}.content")
        if self.tool_choice is not None and not self.tools:
            raise APIError(400, f"tool_choice is only allowed when tools are given; got tool_choice {self.tool_choice!r} "
                                f"without tools", "tool_choice")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "continue_final_message continues the last message instead of starting the assistant's "
                                "turn: send add_generation_prompt: false with it (as vLLM)", "continue_final_message")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise APIError(400, f"continue_final_message continues the last message, which must be the assistant's; "
                                f"got a {self.messages[-1].role!r} message", f"messages.{len(self.messages) - 1}.role")
        taken = sorted(set(self.chat_template_kwargs or {}) & TEMPLATE_ARGUMENTS)
        if taken:
            raise APIError(400, f"chat_template_kwargs holds the template's variables; {taken} are arguments of the "
                                f"template call itself (send them as request fields, where they are ones)",
                           f"chat_template_kwargs.{taken[0]}")  # fmt: skip
        try:
            forced_schema(self.tool_specs() or [], self.tool_choice)
        except ToolChoiceError as err:
            raise APIError(400, str(err), "tool_choice") from None

    def chat(self) -> list[dict[str, Any]]:
        """The messages as the engine takes them (developer -> system; the content as text or checked text parts;
        every other field given, such as ``name`` or ``tool_calls``, kept; an empty ``tool_calls`` list left out, as
        vLLM does: a template that checks ``'tool_calls' in message`` (Llama 3.1's) would render or refuse a call)."""
        return [{**m.model_dump(exclude_none=True, exclude=None if m.tool_calls else {"tool_calls"}), "role": "system" if m.role == "developer" else m.role,
                 "content": m.template_content(f"messages.{i}.content")} for i, m in enumerate(self.messages)]

    @property
    def parses_tools(self) -> bool:
        """Whether the answer's tool calls are parsed out of its text (``tool_choice`` ``"auto"``, given or by default
        with ``tools``): :mod:`.tool_parser`."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    @property
    def max_tool_calls(self) -> int | None:
        """Calls an answer may hand out: 1 with ``parallel_tool_calls: false`` (the first, as vLLM), else no limit."""
        return 1 if self.parallel_tool_calls is False else None

    @property
    def forces_tools(self) -> bool:
        """Whether ``tool_choice`` forces tool calls (``"required"`` or a named function): :mod:`.tool_choice`."""
        return bool(self.tools) and self.tool_choice not in (None, "none", "auto")

    def tool_specs(self) -> list[dict[str, Any]] | None:
        """``tools`` as the chat template takes them (``None`` when there are none)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def wanted_logprobs(self) -> int | None:
        """Top alternatives to return per token (``None`` = no logprobs)."""
        if not self.logprobs:
            if self.top_logprobs:
                raise APIError(400, f"top_logprobs needs logprobs: true; got top_logprobs: {self.top_logprobs} with "
                                    f"logprobs: false", "top_logprobs")
            return None
        return self.top_logprobs or 0


__all__ = ["TEMPLATE_ARGUMENTS", "ChatCompletionRequest", "ChatMessage", "Tool", "ToolFunction"]
