"""One request's token state as the scheduler and the engine see it, and how a sampled token moves it on
(pure Python)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from .outputs import GenerationOutput, RequestMetrics, StreamEvent
from .sampling import RowContext, SamplingParams


class Status(enum.Enum):
    """Where a sequence is: waiting for admission, running (holds blocks), or finished."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request: its prompt, generated tokens, KV blocks and timing.

    ``num_computed`` counts the leading tokens whose keys/values are in the cache; the tokens
    after it still have to go through the model (the prompt during prefill, the last sampled
    token during decode). Preemption drops the cache and resets ``num_computed`` to 0; the
    prompt and the generated tokens are kept and recomputed later.
    """

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    index: int = 0  # position in the caller's prompt list
    priority: int = 0  # lower runs first under the "priority" scheduling policy (vLLM's)
    generator: Any = None  # torch.Generator of a sampled request
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    detok: Any = None  # the request's Detokenizer (text deltas, stop strings)
    grammar: Any = None  # its structured output's GrammarState (None: free text)
    bad_words: tuple[tuple[int, ...], ...] = ()  # the token spellings of its params.bad_words (admission.spellings)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[Any] = field(default_factory=list)  # TokenLogprobs per output token, when asked for
    prompt_logprobs: dict[int, Any] = field(default_factory=dict)  # prompt token index (from 1) -> its TokenLogprobs
    block_keys: list[int] = field(default_factory=list)  # prefix-cache chain hashes of its full blocks
    adapter_key: Any = None  # what its keys/values depend on besides the tokens (its LoRA adapter): keys its blocks
    weights_key: Any = None  # the model's weights when it was last admitted (Scheduler.weights_key): keys its blocks too
    num_preemptions: int = 0
    num_cached: int = 0  # prompt tokens taken from the prefix cache at the last admission
    arrival_time: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """True when only the last sampled token is missing from the cache (one-token step)."""
        return bool(self.output_ids) and self.num_pending == 1

    @property
    def is_finished(self) -> bool:
        """True once the sequence has a finish reason."""
        return self.status is Status.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """True while the request asked for ``prompt_logprobs`` and some prompt token's is not computed yet."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    def all_tokens(self) -> list[int]:
        """Prompt + output tokens."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens ``start:stop`` of prompt + output."""
        return (self.prompt_ids + self.output_ids)[start:stop] if stop > len(self.prompt_ids) else self.prompt_ids[start:stop]

    def tokens_left(self, limit: int) -> int:
        """Tokens it may still take before it ends with ``"length"`` (``limit``: most tokens of a sequence)."""
        return min(self.params.max_new_tokens - len(self.output_ids), limit - self.num_tokens)

    def row_context(self, eos: frozenset[int]) -> RowContext:
        """What the sampler needs of it (``eos``: the generator's end-of-sequence ids, banned before ``min_tokens``)."""
        p = self.params
        banned: tuple[int, ...] = ()
        if len(self.output_ids) < p.min_tokens:
            banned = tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(eos))
        if self.bad_words:
            banned += self.bad_word_bans()
        if not p.penalized and not banned:
            return RowContext()
        allowed = None
        if self.grammar is not None:
            allowed = self.grammar.allowed()  # [V] bool
            kept = allowed.clone()
            kept[[t for t in banned if t < kept.shape[0]]] = False
            # min_tokens bans the end only while the grammar allows something else: a complete output must end
            allowed, banned = (kept, ()) if bool(kept.any()) else (allowed, ())
        return RowContext(self.prompt_ids, self.output_ids, banned, allowed)

    def bad_word_bans(self) -> tuple[int, ...]:
        """The tokens that would complete one of its bad words now: the last token of each spelling whose other
        tokens end the output (of a one-token spelling, always)."""
        out, n = self.output_ids, len(self.output_ids)
        return tuple(w[-1] for w in self.bad_words if len(w) - 1 <= n and (len(w) == 1 or out[n - len(w) + 1:] == list(w[:-1])))

    def advance(self, token: int, eos: frozenset[int], limit: int) -> tuple[str | None, str]:
        """Take a sampled ``token`` (already appended to ``output_ids``): why the request ends now (``None`` = it goes
        on) and the text it releases. ``eos``: end-of-sequence ids; ``limit``: most tokens of a sequence."""
        p = self.params
        if self.grammar is not None and not self.grammar.accept(token):  # masked out: a bug, never a wrong output
            self.error = f"token {token} does not continue its structured output"
            return "error", ""
        if token in p.stop_token_ids or (not p.ignore_eos and token in eos) or (self.grammar and self.grammar.done):
            self.stop_reason = token if token in p.stop_token_ids else None  # vLLM's: None for end-of-sequence
            # the stop token's own text only when asked for (an end-of-sequence token is special: it has none)
            return "stop", self.detok.add(token, check_stop=False) if p.include_stop_str_in_output else ""
        text = self.detok.add(token, check_stop=len(self.output_ids) >= p.min_tokens)
        if self.detok.stopped:
            self.stop_reason = self.detok.stopped_by
            return "stop", text
        if len(self.output_ids) >= p.max_new_tokens or self.num_tokens >= limit:
            return "length", text
        return None, text

    def output(self) -> GenerationOutput:
        """Its result as it stands (final once it has ended)."""
        times = self.token_times
        metrics = RequestMetrics(
            prompt_tokens=len(self.prompt_ids),
            output_tokens=len(self.output_ids),
            time_to_first_token=times[0] - self.arrival_time if times else None,
            inter_token_latency=(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
            latency=(self.finish_time - self.arrival_time) if self.finish_time is not None else None,
            num_preemptions=self.num_preemptions,
            cached_tokens=self.num_cached,
        )
        return GenerationOutput(
            index=self.index,
            request_id=self.seq_id,
            prompt_token_ids=list(self.prompt_ids),
            token_ids=list(self.output_ids),
            text=self.detok.text,
            finish_reason=self.finish_reason or "error",
            stop_reason=self.stop_reason if self.finish_reason == "stop" else None,
            error=self.error,
            metrics=metrics,
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            prompt_logprobs=self.prompt_logprob_entries(),
        )

    def prompt_logprob_entries(self) -> list[Any] | None:
        """``GenerationOutput.prompt_logprobs``: ``None`` first, then each prompt token's entry (``None`` when the
        request did not ask)."""
        if self.params.prompt_logprobs is None:
            return None
        return [None] + [self.prompt_logprobs.get(j) for j in range(1, len(self.prompt_ids))]

    def first_prompt_logprobs(self) -> list[Any] | None:
        """:meth:`prompt_logprob_entries` while the request has exactly one token (its first event carries them, so a
        stream can show the prompt's scores before the answer), else ``None``."""
        return self.prompt_logprob_entries() if len(self.output_ids) == 1 else None

    def final_event(self, reason: str, token: int | None, text: str, logprobs: Any) -> StreamEvent:
        """Its final event, once the scheduler has finished it with ``reason``: ``text`` plus the tail the detokenizer
        held back, and its output. A tokenizer whose decode raises still gives the event (``"error"``); a stop string
        in that tail turns ``"length"`` into ``"stop"``."""
        self.finish_time = time.perf_counter()
        try:
            text += self.detok.finish(check_stop=len(self.output_ids) >= self.params.min_tokens)
        except Exception as exc:  # a tokenizer whose decode raises: the request still gets its final event
            self.finish_reason = "error"
            self.error = self.error or f"decoding its output raised {type(exc).__name__}: {exc}"
        if self.detok.stopped and reason == self.finish_reason == "length":  # a stop string in the held-back tail
            self.finish_reason = "stop"
            self.stop_reason = self.detok.stopped_by
        return StreamEvent(self.index, self.seq_id, token, text, finished=True, output=self.output(), logprobs=logprobs,
                           prompt_logprobs=self.first_prompt_logprobs())
