"""The OpenAI API's request shapes, and their mapping to :class:`~llmspeed.SamplingParams` (responses:
:mod:`.openai_responses`): the fields every endpoint shares (:class:`SamplingRequest`), the completions request, and
:func:`parse`; the chat request is in :mod:`.chat_request`.

Requests are validated here (pydantic); a bad value or a field this server does not implement becomes an
:class:`~.api_errors.APIError` with the HTTP status and OpenAI-style body that :mod:`.server` sends.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ..generation import SamplingParams, StructuredOutputsParams
from ..names import shown as _shown
from .api_errors import APIError, invalid
from .structured_fields import FieldError, structured_outputs


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


class SamplingRequest(StrictRequest):
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
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # an extension (vLLM's): the prompt's tokens scored
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
                 vocab_size: int | None = None, defaults: dict[str, Any] | None = None) -> SamplingParams:  # fmt: skip
        """The :class:`SamplingParams` of choice ``seed_offset`` (choices of ``n > 1`` get consecutive seeds);
        ``vocab_size``: the model's, which ``logit_bias`` ids must stay below; ``defaults``: values of the fields the
        request leaves out (the model's generation config: :mod:`.sampling_defaults`)."""
        unset = {k: v for k, v in (defaults or {}).items() if k not in self.model_fields_set}
        temperature, top_p, top_k, min_p, repetition_penalty = (
            unset.get(k, getattr(self, k)) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"))
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
                max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                top_k=max(top_k, 0), seed=None if self.seed is None else (self.seed + seed_offset) % 2**64,
                stop=tuple(stop), logprobs=logprobs, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, repetition_penalty=repetition_penalty,
                min_tokens=self.min_tokens, logit_bias=tuple(bias.items()), min_p=min_p,
                prompt_logprobs=self.prompt_alternatives(logprobs), structured_outputs=structured,
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

    def prompt_alternatives(self, logprobs: int | None) -> int | None:
        """How many alternatives each prompt token's entry needs (``None``: no prompt log-probabilities)."""
        return self.prompt_logprobs

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
        if self.prompt_logprobs is not None and self.stream:  # as vLLM: they are answered with the whole response
            raise APIError(400, "prompt_logprobs are answered without streaming; send stream: false",
                           "prompt_logprobs")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, f"stream_options is only allowed with stream: true; got stream: {str(self.stream).lower()}",
                           "stream_options")


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt, generate nothing
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompt_alternatives(self, logprobs: int | None) -> int | None:
        """With ``echo``, the prompt's tokens come back with their log-probabilities too (as OpenAI's and vLLM's);
        with ``prompt_logprobs`` as well, the larger count is computed and each view keeps its own."""
        wanted = [k for k in (logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(wanted) if wanted else None

    def check(self) -> None:
        """Refuse combinations of fields that each are valid alone (``best_of`` candidates fewer than the ``n`` asked,
        ``max_tokens: 0`` without ``echo``)."""
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be at least 1 (got 0); 0 is only taken with echo: true (the prompt "
                                "scored, nothing generated)", "max_tokens")  # fmt: skip
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
