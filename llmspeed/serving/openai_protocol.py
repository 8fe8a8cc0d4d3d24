"""The OpenAI API's request shapes, and their mapping to :class:`~llmspeed.SamplingParams` (responses:
:mod:`.openai_responses`).

Requests are validated here (pydantic); a bad value or a field this server does not implement becomes an
:class:`~.api_errors.APIError` with the HTTP status and OpenAI-style body that :mod:`.server` sends.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ..generation import SamplingParams, StructuredOutputsParams
from ..generation.chat_content import ContentPartError, content_text
from ..names import shown as _shown
from .api_errors import APIError, invalid
from .structured_fields import FieldError, structured_outputs
from .tool_choice import ToolChoiceError, forced_schema


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` (a usage chunk before ``[DONE]``, ``"usage": null`` on the others), and
    ``include_obfuscation``, taken and ignored (no chunk is padded against side channels here)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class StrictRequest(BaseModel):
    """A request body as OpenAI's API reads one: unknown fields are refused rather than silently ignored; types are
    strict (``"0.5"`` is not a temperature, ``2.0`` not an ``n``, ``"false"`` not a boolean: a lax parse read
    ``"false"`` as true; an int is a valid number); ``null`` for a field with a default is that default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """``null`` for a field with a default is that default, as OpenAI's API ("number or null") and vLLM take it
        (the ``openai`` client sends ``temperature=None`` as ``null``); a required field's ``null`` stays an error."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields
                or cls.model_fields[k].is_required()}


# apply_chat_template's own arguments, which chat_template_kwargs may not set (the rest are template variables)
TEMPLATE_ARGUMENTS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                                "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                                "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


class _Request(StrictRequest):
    """Fields the completions and chat endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # an extension (vLLM's): -1 or 0 keep every token
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # negative as vLLM (int64): taken mod 2**64
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)  # an extension (vLLM's)
    min_tokens: int = Field(default=0, ge=0)  # an extension (vLLM's)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # an extension (vLLM's)
    ignore_eos: bool = False  # an extension (vLLM's; its benchmark client sends it for fixed-length outputs)
    stop_token_ids: list[int] | None = None  # an extension (vLLM's): ids that end the answer as eos does
    include_stop_str_in_output: bool = False  # an extension (vLLM's): the stop string or token's text is kept
    allowed_token_ids: list[int] | None = None  # an extension (vLLM's): sample only these
    bad_words: list[str] | None = None  # an extension (vLLM's): words never generated
    priority: int = 0  # an extension (vLLM's): lower runs first on a server with --scheduling-policy priority
    skip_special_tokens: bool = True  # an extension (vLLM's): False keeps special tokens' text in the answer
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # structured outputs (.structured_fields): OpenAI's response_format, vLLM's structured_outputs and guided_* fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    _structured: Any = PrivateAttr(default=False)  # structured() once read (False: not yet)

    def sampling(self, max_tokens: int, logprobs: int | None, seed_offset: int = 0,
                 vocab_size: int | None = None) -> SamplingParams:  # fmt: skip
        """The :class:`SamplingParams` of choice ``seed_offset`` (choices of ``n > 1`` get consecutive seeds);
        ``vocab_size``: the model's, which ``logit_bias`` ids must stay below."""
        bias = self.token_biases(vocab_size)
        if self.min_tokens > max_tokens:  # as vLLM: a default max_tokens (16 for completions) bounds it too
            name, given = self.max_tokens_given()
            bound = f"{name}={max_tokens}" if given is not None else f"the default max_tokens={max_tokens} (none given)"
            raise APIError(400, f"min_tokens must be at most {bound}; got {self.min_tokens}", "min_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise APIError(400, f"stop strings must be non-empty; got {_shown(self.stop)}", "stop")
        structured = self.structured()
        for ids in ("stop_token_ids", "allowed_token_ids"):
            bad = next((t for t in getattr(self, ids) or [] if not 0 <= t < (vocab_size or 2**63)), None)
            if bad is not None:
                raise APIError(400, f"{ids} must be token ids in [0, {vocab_size}); got {bad}", ids)
        try:
            return SamplingParams(
                max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=max(self.top_k, 0), seed=None if self.seed is None else (self.seed + seed_offset) % 2**64,
                stop=tuple(stop), logprobs=logprobs, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                min_tokens=self.min_tokens, logit_bias=tuple(bias.items()), min_p=self.min_p,
                prompt_logprobs=self.prompt_logprobs(logprobs), structured_outputs=structured,
                ignore_eos=self.ignore_eos, stop_token_ids=tuple(self.stop_token_ids or ()),
                include_stop_str_in_output=self.include_stop_str_in_output, bad_words=tuple(self.bad_words or ()),
                allowed_token_ids=None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
                skip_special_tokens=self.skip_special_tokens,
            )
        except ValueError as err:  # SamplingParams names its field in backticks: the param is the API's name for it
            field = str(err).split("`")[1] if str(err).count("`") >= 2 else None
            param = None if field is None else {"max_new_tokens": "max_tokens"}.get(field, field)
            raise APIError(400, str(err), param) from None

    def structured(self) -> StructuredOutputsParams | None:
        """What the output must look like (``None``: free text), read once: the choices of ``n > 1`` share it."""
        if self._structured is False:
            try:
                self._structured = structured_outputs(self)
            except FieldError as err:
                raise APIError(400, str(err), err.param) from None
        return self._structured

    def token_biases(self, vocab_size: int | None) -> dict[int, float]:
        """``logit_bias`` with its keys as token ids: OpenAI's API names each token by its id in a string
        (``{"50256": -100}``), with a bias from -100 to 100."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise APIError(400, f"logit_bias keys must be token ids written as decimal strings, as "
                                    f"{{\"50256\": -100}}; got {key!r}", "logit_bias")  # fmt: skip
            if not -100.0 <= value <= 100.0:
                raise APIError(400, f"logit_bias values must be from -100 to 100; got {value!r} for token {key}",
                               "logit_bias")
            tid = int(key) if len(key) <= 18 else 2**63  # past Python's 4300-digit int() limit: no token id either
            if vocab_size is not None and tid >= vocab_size:
                raise APIError(400, f"logit_bias token ids must be below the vocabulary size {vocab_size}; got "
                                    f"{key if len(key) <= 40 else key[:40] + '...'}", "logit_bias")  # fmt: skip
            bias[tid] = value
        return bias

    def prompt_logprobs(self, logprobs: int | None) -> int | None:
        """How many alternatives each prompt token's entry needs (``None``: no prompt log-probabilities)."""
        return None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options is not None and self.stream_options.include_usage)

    def max_tokens_given(self) -> tuple[str, int | None]:
        """The field that bounds the answer's length and its value (``None`` when not given)."""
        return "max_tokens", self.max_tokens

    def check(self) -> None:
        """Refuse combinations of fields that each are valid alone."""
        name, given = self.max_tokens_given()
        if given is not None and self.min_tokens > given:  # as vLLM (sampling() checks defaults)
            raise APIError(400, f"min_tokens must be at most {name}={given}; got {self.min_tokens}", "min_tokens")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, f"stream_options is only allowed with stream: true; got stream: {str(self.stream).lower()}",
                           "stream_options")


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt, generate nothing
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompt_logprobs(self, logprobs: int | None) -> int | None:
        """With ``echo``, the prompt's tokens come back with their log-probabilities too (as OpenAI's and vLLM's)."""
        return logprobs if self.echo else None

    def check(self) -> None:
        """Refuse combinations of fields that each are valid alone (``best_of`` candidates fewer than the ``n`` asked,
        ``max_tokens: 0`` without ``echo``, ``echo`` with ``stream``)."""
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be at least 1 (got 0); 0 is only taken with echo: true (the prompt "
                                "scored, nothing generated)", "max_tokens")  # fmt: skip
        if self.echo and self.stream:
            raise APIError(400, "echo is answered without streaming here; send stream: false", "echo")
        super().check()
        if self.best_of is not None and self.best_of < self.n:  # as OpenAI and vLLM: n choices come from best_of
            raise APIError(400, f"best_of must be at least n={self.n}; got {self.best_of}", "best_of")

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one (text or token ids), or several (a list of texts or of token id lists), as
        OpenAI's API and vLLM take them (evaluation harnesses send a batch of prompts per request)."""
        p = self.prompt
        if not p:
            raise APIError(400, "prompt is empty", "prompt")
        several = isinstance(p, list) and isinstance(p[0], (str, list))
        prompts = cast("list[str | list[int]]", list(p) if several else [p])
        for i, one in enumerate(prompts):
            if not one:
                raise APIError(400, f"prompt.{i} is empty", f"prompt.{i}")
        return prompts

    def prompt_param(self, i: int) -> str:
        """The field that names prompt ``i`` in an error (``prompt``, or ``prompt.3`` of several)."""
        p = self.prompt
        return f"prompt.{i}" if isinstance(p, list) and p and isinstance(p[0], (str, list)) else "prompt"


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


class ChatCompletionRequest(_Request):
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
        if self.echo and self.stream:
            raise APIError(400, "echo is answered without streaming here; send stream: false", "echo")
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


def parse(kind: type[BaseModel], payload: Any) -> Any:
    """Validate a decoded JSON body as ``kind`` (and its ``check()``, where it has one); a bad body is a 400 naming
    the field."""
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object; got {type(payload).__name__}")
    try:
        request = kind.model_validate(payload)
    except ValidationError as err:
        raise invalid(err.errors()) from None
    check = getattr(request, "check", None)
    if callable(check):  # the chat, completions and Responses requests
        check()
    return request
