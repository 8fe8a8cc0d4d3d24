"""Per-request sampling: :class:`SamplingParams` and the sampler of a step's rows.

Every request carries its own parameters and its own ``torch.Generator``; the sampler draws a
request's randomness only from that generator, so a seeded request produces the same tokens
whatever else shares the batch. Two things loop over rows in Python: the random draw (one
``torch.rand`` of one number per random row, from its own generator) and the penalties and token bans (per row
that has them; none when no request asks). Greedy rows take one ``argmax``; random rows are sampled together
by :func:`.categorical.sample_rows` (temperature, top-k and top-p from the host's parameters); one host transfer
per step.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .categorical import filter_rows, host_tensor, min_p_rows, sample_rows

# Below this temperature sampling is greedy: dividing by it would overflow to inf / NaN (vLLM uses the same bound).
GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20


def is_int(x: object) -> bool:
    """Whether ``x`` is an int and not a bool (``True`` is an int to Python, never a count or an id here)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _integral(x: object) -> bool:
    """Whether ``x`` is an integer of any kind (``int``, ``np.int64``) and not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bias_pairs(given: object) -> tuple[tuple[int, float], ...] | None:
    """``logit_bias`` (a mapping ``{token id: bias}`` or ``(id, bias)`` pairs) as pairs in id order; ``None`` when it
    is neither, or an id is not an integer >= 0 (or repeats), or a bias is not a finite number."""
    items = tuple(given.items()) if isinstance(given, Mapping) else _as_tuple(given)
    if items is None or isinstance(given, str) or not all(isinstance(i, (tuple, list)) and len(i) == 2 for i in items):
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

    def _as_python_numbers(self) -> None:
        """NumPy (any ``numbers``) integers and reals as Python's ``int`` / ``float``: ``np.int64(5)`` is an integer,
        and a real past float's range (``10**400``) is ``inf``, which the checks refuse, not a crash at sampling."""
        for name in ("max_new_tokens", "top_k", "seed", "logprobs", "min_tokens"):
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
        """True when a repetition, presence or frequency penalty or a logit bias changes the logits (the argmax too:
        such requests are never left to a loop that takes the model's argmax)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias))


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
        unknown = sorted(set(sampling) - set(SamplingParams.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"sampling has unknown keys {unknown}; SamplingParams takes {sorted(SamplingParams.__dataclass_fields__)}"
            )
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
    """

    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    banned: Sequence[int] = ()


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities around one sampled token.

    Attributes:
        token_id: The sampled token.
        logprob: Its log-probability under the model.
        top: The most likely tokens, ``(token_id, logprob)``, most likely first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:  # [V] -> [V]
    """Set logits outside the top-k / top-p (nucleus) set to ``-inf`` (one row)."""
    row = logits[None]  # [1, V]
    k = torch.tensor([min(top_k, logits.shape[-1])], device=logits.device)  # a k past the vocabulary keeps all
    p = torch.tensor([float(top_p)], dtype=torch.float64, device=logits.device)  # fp32 would round 1 - 1e-8 to 1: off
    return filter_rows(row, k, p)[0]


def _penalize(logits: torch.Tensor, params: Sequence[SamplingParams], rows: Sequence[RowContext]) -> torch.Tensor:
    """Apply logit biases, then repetition / presence / frequency penalties and bans (vLLM's order), to the rows that
    have them (``[N, V]``)."""
    if not any(p.penalized for p in params) and not any(r.banned for r in rows):
        return logits
    logits = logits.clone()
    dev = logits.device
    for i, (p, ctx) in enumerate(zip(params, rows)):
        row = logits[i]  # [V]
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias)
            row.index_add_(0, host_tensor(ids, torch.long, dev), host_tensor(biases, row.dtype, dev))
        if p.repetition_penalty != 1.0:
            seen = host_tensor(sorted({*ctx.prompt_ids, *ctx.output_ids}), torch.long, dev)  # [S]
            vals = row.index_select(0, seen)  # [S]
            new = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)  # [S]
            # an extreme penalty (1e-40 divides, 1e40 multiplies) overflows finite logits to +-inf, and a row of
            # several +inf has no softmax: the largest finite values keep the order and the ties
            big = torch.finfo(row.dtype).max
            row.index_copy_(0, seen, torch.where(vals.isfinite(), new.clamp(-big, big), new))
        if (p.presence_penalty or p.frequency_penalty) and ctx.output_ids:
            out = host_tensor(list(ctx.output_ids), torch.long, dev)  # [O]
            counts = torch.zeros_like(row).index_add_(0, out, torch.ones_like(out, dtype=row.dtype))  # [V]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        banned = [t for t in ctx.banned if t < row.shape[0]]  # an id past the vocabulary is never sampled anyway
        if banned:
            row[host_tensor(banned, torch.long, dev)] = float("-inf")
    return logits


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:  # [N] int64
    """The index of each row's largest value: the first one on ties, the first NaN if a row has one.

    On the CPU, fp32 rows go through NumPy's vectorized argmax, with the same rules: torch's CPU argmax
    walks a 49k-token vocabulary at about 2.7 ns a value (130 us a row on the 2-core Xeon, 1% of a
    quantized decode step), NumPy's in about 8 us.
    """
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and not scores.requires_grad:
        return torch.from_numpy(scores.numpy().argmax(-1))
    return scores.argmax(dim=-1)


def sample_batch(
    logits: torch.Tensor,  # [N, V], one row per request that needs a token
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    rows: Sequence[RowContext] | None = None,
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Pick one token per row; return the tokens and, for rows that asked, their log-probabilities.

    Greedy rows take the argmax; random rows take one exact sample of their filtered, temperature-scaled
    softmax from one uniform number of their own generator (:func:`.categorical.sample_rows`), so a row's
    result never depends on the other rows. One host transfer for the whole batch.
    """
    n = logits.shape[0]
    rows = rows if rows is not None else [RowContext()] * n
    raw = logits.float()  # [N, V]
    tokens = sample_ids(raw, params, generators, rows)  # [N]
    token_list = tokens.tolist()
    wanted = [p.logprobs for p in params]
    if all(w is None for w in wanted):
        return token_list, [None] * n
    logp = torch.log_softmax(raw, dim=-1)  # [N, V]
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()  # [N]
    kmax = min(max(w or 0 for w in wanted), logp.shape[1])  # a vocabulary under 20 tokens has that many alternatives
    best = logp.topk(kmax, dim=-1) if kmax else (logp[:, :0], logp[:, :0].long())  # [N, K] each
    top_vals, top_ids = best[0].tolist(), best[1].tolist()
    out: list[TokenLogprobs | None] = []
    for i, w in enumerate(wanted):
        if w is None:
            out.append(None)
            continue
        top = tuple((int(t), float(v)) for t, v in zip(top_ids[i][:w], top_vals[i][:w]))
        out.append(TokenLogprobs(token_list[i], float(chosen[i]), top))
    return token_list, out


def sample_ids(
    logits: torch.Tensor,  # [N, V]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    rows: Sequence[RowContext] | None = None,
) -> torch.Tensor:  # [N] int64, on the logits' device (or the CPU)
    """The tokens :func:`sample_batch` picks, left where they are computed: no host transfer, so a GPU burst
    (:meth:`.runner.ModelRunner.burst_steps`) can feed them to the next step without waiting for this one."""
    n = logits.shape[0]
    rows = rows if rows is not None else [RowContext()] * n
    scores = _penalize(logits.float(), params, rows)  # [N, V]
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        dev = scores.device
        idx = host_tensor(random_rows, torch.long, dev)  # [R]
        sub = [params[i] for i in random_rows]
        # a temperature past fp32's range would be inf there, and a banned token's -inf / inf a NaN, which is drawn
        temps = host_tensor([min(p.temperature, torch.finfo(torch.float32).max) for p in sub], torch.float32, dev)  # [R]
        top_k, top_p = [p.top_k for p in sub], [float(p.top_p) for p in sub]  # host values: no wait on a GPU
        every = len(random_rows) == n  # the usual batch: one kind of row, no copies of rows
        scaled = (scores if every else scores.index_select(0, idx)) / temps[:, None]  # [R, V]
        scaled = min_p_rows(scaled, [p.min_p for p in sub])  # [R, V]
        picked = sample_rows(scaled, top_k, top_p, [generators[i] for i in random_rows])  # [R]
        return picked if every else argmax_rows(scores).to(dev).index_copy(0, idx, picked)
    return argmax_rows(scores)  # [N]


def sample(
    logits: torch.Tensor,  # [N, V]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Pick one token per row (see :func:`sample_batch`, which also returns log-probabilities)."""
    return sample_batch(logits, params, generators)[0]
