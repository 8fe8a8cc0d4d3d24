"""Per-request sampling parameters: :class:`SamplingParams` (validated, hashable), each request's own
``torch.Generator``, and the small records the sampler (:mod:`.sampler`) reads and returns.

Every request carries its own parameters and its own generator; the sampler draws a request's randomness only
from that generator, so a seeded request produces the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .structured_params import StructuredOutputsParams, coerce_structured

# Below this temperature sampling is greedy: dividing by it would overflow to inf / NaN (vLLM uses the same bound).
GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20


# other libraries' names for what these parameters do (vLLM's and OpenAI's, transformers' generate), named in errors
RENAMED = {"max_tokens": "use max_new_tokens", "max_length": "use max_new_tokens (it counts new tokens only)",
           "do_sample": "use temperature (0 is greedy)", "num_beams": "beam search is not implemented",
           "stop_strings": "use stop", "sampling_params": "pass it as sampling=, or second, as vLLM's LLM.generate"}


def unknown_names(unknown: Sequence[str], accepted: Sequence[str] = ()) -> str:
    """``unknown`` (sorted names) with what to use instead: :data:`RENAMED`'s advice, else the closest of
    ``accepted`` (a misspelling: ``temprature``)."""
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, accepted, n=1)
        if k in RENAMED or close:
            hints.append(f"{k}: {RENAMED[k] if k in RENAMED else 'did you mean ' + close[0] + '?'}")
    return f"{list(unknown)}{' (' + '; '.join(hints) + ')' if hints else ''}"


def is_int(x: object) -> bool:
    """Whether ``x`` is an int and not a bool (``True`` is an int to Python, never a count or an id here)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _integral(x: object) -> bool:
    """Whether ``x`` is an integer of any kind (``int``, ``np.int64``) and not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bias_pairs(given: object) -> tuple[tuple[int, float], ...] | None:
    """``logit_bias`` (a mapping ``{token id: bias}``, ``(id, bias)`` pairs, or ``None`` for none, as vLLM's default)
    as pairs in id order; ``None`` when it is none of these, an id is not an integer >= 0 (or repeats), or a bias is
    not a finite number."""
    if given is None:
        return ()
    items = tuple(given.items()) if isinstance(given, Mapping) else _as_tuple(given)
    if items is None or not all(isinstance(i, (tuple, list)) and len(i) == 2 for i in items):
        return None
    pairs = []
    for tid, bias in items:
        if not _integral(tid) or tid < 0 or not isinstance(bias, numbers.Real) or isinstance(bias, bool):
            return None
        if not abs(float(bias)) < float("inf"):  # NaN and infinities: no logit to add them to
            return None
        pairs.append((int(tid), float(bias)))
    ids = [tid for tid, _ in pairs]
    return tuple(sorted(pairs)) if len(set(ids)) == len(ids) else None


def _as_tuple(x: object) -> tuple | None:
    """``x`` as a tuple when it is iterable (a list, a tuple, a generator); ``None`` when it is not."""
    try:
        return tuple(x)  # type: ignore[arg-type]
    except TypeError:
        return None


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    Attributes:
        max_new_tokens: Most tokens to generate (finish reason ``"length"`` when reached).
        temperature: Softmax temperature; ``0`` (or anything below 1e-5) means greedy (argmax).
        top_k: Keep only the ``top_k`` most likely tokens (``0`` keeps all).
        top_p: Keep the smallest set of tokens whose probability reaches ``top_p`` (``1.0`` keeps all).
        seed: Seed of this request's own random generator (0 to 2**64 - 1); the same seed gives the same
            tokens whatever the batch composition. ``None`` draws a seed from torch's global RNG. torch's CPU
            generator keeps 32 bits of a seed, so on the CPU a seed from 2**32 up is hashed to 32 bits (seeds that
            differ only above bit 32 would otherwise give the same tokens).
        stop: Strings that end generation when they appear in the output text (they are cut off, and a
            stream never shows text that a stop string later removes).
        stop_token_ids: Token ids that end generation (kept in ``token_ids``).
        ignore_eos: Keep generating after the model's end-of-sequence tokens.
        adapter: Name of a LoRA adapter to run this request with (``None``: the model's active adapter as set
            by ``lora.set_adapter`` when the request steps, the base model when none is active; ``False``: the
            base model alone, whatever adapter is active, as vLLM runs a request without a LoRA request).
            After ``lora.merge_and_unload`` the model has no LoRA layers left, so its "base model" is the
            merged model (as after PEFT's ``merge_and_unload``, there is no unadapted base to go back to).
        logprobs: Also return the log-probability of each sampled token and the ``logprobs`` most
            likely alternatives (0 to 20; ``None`` = none). They are the model's own distribution
            (raw logits, before logit biases, penalties, temperature and filtering), as vLLM returns by default.
        min_tokens: Generate at least this many tokens: end-of-sequence and ``stop_token_ids`` cannot be
            sampled before (stop strings are not checked either).
        repetition_penalty: Divide positive logits (multiply negative ones) of every token already in the
            prompt or output by this (transformers' / CTRL's penalty; ``1.0`` = off).
        presence_penalty: Subtract this from the logit of every token already generated (OpenAI; -2 to 2).
        frequency_penalty: Subtract this times its count from every generated token's logit (OpenAI; -2 to 2).
        logit_bias: Added to the logits of these tokens before the penalties, temperature and filtering: a mapping
            ``{token id: bias}`` (OpenAI's and vLLM's ``logit_bias``; -100 all but bans a token, +100 all but forces
            it), kept as ``(id, bias)`` pairs in id order. Ids must be below the model's vocabulary size (a request
            with one past it ends with ``"error"``).
        min_p: Drop the tokens whose probability (after the temperature) is below ``min_p`` times the most likely
            token's, before top-k and top-p (vLLM's and transformers' ``min_p``; ``0.0`` = off). Greedy requests
            are not affected: the most likely token is always kept.
        prompt_logprobs: Also return, for every prompt token after the first, its log-probability given the tokens
            before it and the ``prompt_logprobs`` most likely alternatives (0 to 20; ``None`` = none), as vLLM's
            ``prompt_logprobs`` (``GenerationOutput.prompt_logprobs``). The prompt then runs through the model in
            full: no prefix-cache hit, and no fused CPU step for its prompt chunks.
        include_stop_str_in_output: Keep the stop string (or the text of the stop token) that ended the output at
            its end, as vLLM's option of that name (end-of-sequence tokens are special: they have no text).
        allowed_token_ids: Sample only these tokens (vLLM's ``allowed_token_ids``; ``None``: any token). Ids must be
            below the model's vocabulary size (a request with one past it ends with ``"error"``).
        skip_special_tokens: Leave special tokens' text (an end-of-turn marker, a chat template's tags) out of the
            output text, as ``decode(..., skip_special_tokens=True)`` (default); ``False`` keeps it (vLLM's option).
        bad_words: Words never to generate (vLLM's ``bad_words``): each is tokenized with and without a leading space,
            and the last token of such a spelling is banned whenever the output ends with the tokens before it (a
            one-token word is always banned). Needs the model's tokenizer.
        structured_outputs: What the output must look like (:class:`~.structured_params.StructuredOutputsParams`,
            or a dict of its fields: ``{"json": schema}``, ``{"regex": ...}``, ``{"choice": [...]}``,
            ``{"grammar": ...}``, ``{"json_object": True}``), as vLLM's: tokens that cannot continue a valid output
            are masked out before sampling (needs the xgrammar package and a tokenizer; ``None`` = free text).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    adapter: str | Literal[False] | None = None  # False: the base model alone (True is refused)
    logprobs: int | None = None
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    min_p: float = 0.0
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    include_stop_str_in_output: bool = False
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = field(default_factory=tuple)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._as_python_numbers()
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be an integer >= 1; got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"`temperature` must be a finite number >= 0 (0 = greedy); got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"`top_k` must be an integer >= 0 (0 = no top-k filter); got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1]; got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"`seed` must be None or an integer in [0, 2**64); got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else _as_tuple(self.stop)
        if stop is None or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"`stop` must be a non-empty string or a list of them (() for none); got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        given: object = self.stop_token_ids
        ids = (given,) if _integral(given) else _as_tuple(given)
        ids = ids if ids is None else tuple(int(t) if _integral(t) else t for t in ids)
        if ids is None or not all(is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"`stop_token_ids` must be integers >= 0; got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"`ignore_eos` must be a bool; got {self.ignore_eos!r}")
        if self.adapter is not None and self.adapter is not False and (not isinstance(self.adapter, str) or not self.adapter):
            raise ValueError(f"`adapter` must be None (the active adapter), False (the base model alone) or a non-empty "
                             f"adapter name; got {self.adapter!r}")  # fmt: skip
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"`logprobs` must be None or an integer from 0 to {MAX_LOGPROBS}; got {self.logprobs!r}")
        wanted = self.prompt_logprobs
        if wanted is not None and (not is_int(wanted) or not 0 <= wanted <= MAX_LOGPROBS):
            raise ValueError(f"`prompt_logprobs` must be None or an integer from 0 to {MAX_LOGPROBS}; got {wanted!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(
                f"`min_tokens` must be an integer from 0 to max_new_tokens={self.max_new_tokens}; got {self.min_tokens!r}"
            )
        rp = self.repetition_penalty
        if not _is_number(rp) or not 0 < rp < float("inf"):
            raise ValueError(f"`repetition_penalty` must be a finite number > 0 (1.0 = off); got {rp!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"`{name}` must be a number from -2 to 2 (0 = off); got {value!r}")
        bias = _bias_pairs(self.logit_bias)
        if bias is None:
            raise ValueError(f"`logit_bias` must map token ids (integers >= 0, each once) to finite numbers, as "
                             f"{{50256: -100}}; got {self.logit_bias!r}")  # fmt: skip
        object.__setattr__(self, "logit_bias", bias)
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"`min_p` must be a number from 0 to 1 (0 = off); got {self.min_p!r}")
        object.__setattr__(self, "structured_outputs", coerce_structured(self.structured_outputs))
        for flag in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"`{flag}` must be a bool; got {getattr(self, flag)!r}")
        if self.allowed_token_ids is not None:
            allowed = _as_tuple(self.allowed_token_ids)
            allowed = allowed if allowed is None else tuple(int(t) if _integral(t) else t for t in allowed)
            if not allowed or not all(is_int(t) and t >= 0 for t in allowed):
                raise ValueError(f"`allowed_token_ids` must be None (any token) or a non-empty list of token ids "
                                 f"(integers >= 0); got {self.allowed_token_ids!r}")  # fmt: skip
            object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(allowed))))
        words = (self.bad_words,) if isinstance(self.bad_words, str) else _as_tuple(self.bad_words)
        if words is None or not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError(f"`bad_words` must be a list of words (non-blank strings; () for none); got "
                             f"{self.bad_words!r}")  # fmt: skip
        object.__setattr__(self, "bad_words", words)

    def _as_python_numbers(self) -> None:
        """NumPy (any ``numbers``) integers and reals as Python's ``int`` / ``float``: ``np.int64(5)`` is an integer,
        and a real past float's range (``10**400``) is ``inf``, which the checks refuse, not a crash at sampling."""
        for name in ("max_new_tokens", "top_k", "seed", "logprobs", "min_tokens", "prompt_logprobs"):
            if _integral(getattr(self, name)):
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                try:
                    value = float(value)
                except OverflowError:
                    value = float("inf") if value > 0 else float("-inf")
                object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0, or below 1e-5)."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """True when a repetition, presence or frequency penalty, a logit bias, allowed tokens, bad words or structured
        outputs change the logits (the argmax too: such requests are never left to a loop that takes the model's
        argmax)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias) or self.structured_outputs is not None or self.allowed_token_ids is not None
                or bool(self.bad_words))


_dataclass_init = SamplingParams.__init__


@functools.wraps(_dataclass_init)
def _init(self: SamplingParams, *args: Any, **kwargs: Any) -> None:
    """The dataclass's ``__init__``, with an unknown keyword named with what to use instead (``max_tokens``, vLLM's
    and OpenAI's name, is ``max_new_tokens`` here) rather than Python's bare "unexpected keyword argument"."""
    fields = list(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(f"SamplingParams got unknown keyword arguments {unknown_names(unknown, fields)}; it takes "
                        f"{fields}")  # fmt: skip
    _dataclass_init(self, *args, **kwargs)


SamplingParams.__init__ = _init  # type: ignore[method-assign]


def coerce(sampling: object) -> SamplingParams:
    """``sampling`` as :class:`SamplingParams`: ``None`` gives the defaults, a dict its fields.

    Raises:
        TypeError: anything else, naming what is accepted.
        ValueError: a dict with unknown keys or bad values (naming them).
    """
    if sampling is None:
        return SamplingParams()
    if isinstance(sampling, SamplingParams):
        return sampling
    if isinstance(sampling, dict):
        fields = list(SamplingParams.__dataclass_fields__)
        unknown = sorted(set(sampling) - set(fields))
        if unknown:
            raise ValueError(f"sampling has unknown keys {unknown_names(unknown, fields)}; SamplingParams takes "
                             f"{sorted(fields)}")  # fmt: skip
        return SamplingParams(**sampling)
    raise TypeError(f"sampling must be a SamplingParams (or a dict of its fields); got {type(sampling).__name__}")


def sampling_list(sampling: Any, n: int) -> list[SamplingParams]:
    """``sampling`` (one :class:`SamplingParams`, a dict of its fields, ``None``, or one per prompt) for ``n`` prompts;
    ``TypeError`` / ``ValueError`` for anything else or a list of another length."""
    if sampling is None or isinstance(sampling, (SamplingParams, dict)) or not hasattr(sampling, "__iter__"):
        return [coerce(sampling)] * n
    params = [coerce(p) for p in sampling]
    if len(params) != n:
        raise ValueError(f"sampling must be one SamplingParams or one per prompt ({n}); got {len(params)}")
    return params


def split_sampling_kwargs(kwargs: dict) -> dict:
    """Pop the :class:`SamplingParams` fields (``max_new_tokens=...``) out of ``kwargs``; return them."""
    return {k: kwargs.pop(k) for k in list(kwargs) if k in SamplingParams.__dataclass_fields__}


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own RNG (``None`` for greedy requests, which need none)."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    if torch.device(device).type == "cpu" and seed >= 2**32:  # mt19937 keeps the low 32 bits: mix in the rest
        seed = int.from_bytes(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=4).digest(), "little")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class RowContext:
    """What the sampler needs to know of one row's request beyond its parameters.

    Attributes:
        prompt_ids: The prompt (for the repetition penalty).
        output_ids: Tokens generated so far (penalties, ``min_tokens``).
        banned: Token ids that may not be sampled now (end-of-sequence before ``min_tokens``).
        allowed: ``[V]`` bool, the tokens its structured output allows next (``None``: every token).
    """

    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    banned: Sequence[int] = ()
    allowed: torch.Tensor | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities around one sampled token.

    Attributes:
        token_id: The sampled token.
        logprob: Its log-probability under the model.
        top: The most likely tokens, ``(token_id, logprob)``, most likely first.
        rank: The token's place in the vocabulary by log-probability, from 1 (the most likely), as vLLM's ``rank``:
            one more than the number of tokens strictly more likely.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None
