"""What the generator hands back: per-request outputs and metrics, stream events, run statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestMetrics:
    """Timing and token counts of one request (seconds; ``None`` when no token was produced).

    Attributes:
        prompt_tokens: Tokens in the prompt.
        output_tokens: Tokens generated.
        time_to_first_token: From ``add_request`` to the first generated token.
        inter_token_latency: Mean time between consecutive generated tokens.
        latency: From ``add_request`` to the end of the request.
        num_preemptions: Times the request was preempted (and recomputed).
        cached_tokens: Prompt tokens whose KV came from the prefix cache (at the last admission).
    """

    prompt_tokens: int
    output_tokens: int
    time_to_first_token: float | None
    inter_token_latency: float | None
    latency: float | None
    num_preemptions: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class GenerationOutput:
    """The result of one request.

    Attributes:
        index: Position of the prompt in the list given to ``generate_batched`` / ``stream``.
        request_id: Id returned by ``Generator.add_request``.
        prompt_token_ids: The tokenized prompt.
        token_ids: Generated tokens (a stop token id is kept; text after a stop string is not).
        text: Decoded generated text, cut before a stop string (after it with ``include_stop_str_in_output``; ``""``
            without a tokenizer).
        finish_reason: ``"stop"``, ``"length"``, ``"abort"`` or ``"error"``.
        error: The message when ``finish_reason == "error"``.
        metrics: Timings and counts.
        logprobs: One :class:`~.sampling.TokenLogprobs` per generated token when the request asked
            for ``logprobs``, else ``None``.
        prompt_logprobs: When the request asked for ``prompt_logprobs``: one entry per prompt token, ``None`` for the
            first (nothing comes before it), then each token's :class:`~.sampling.TokenLogprobs` given the tokens
            before it (``None`` for a token the model never reached: a request that ended before its prompt ran).
        stop_reason: What ended a ``"stop"`` output, as vLLM's ``stop_reason``: the stop string, or the id from
            ``stop_token_ids``; ``None`` for an end-of-sequence token, a completed structured output and any other
            finish reason.
    """

    index: int
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str | None
    metrics: RequestMetrics
    logprobs: list[Any] | None = None
    prompt_logprobs: list[Any] | None = None
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class StreamEvent:
    """One generated token of one request, or the end of a request.

    Attributes:
        index: Position of the prompt in the caller's list.
        request_id: Id of the request.
        token_id: The new token (``None`` for an event that only reports an end, e.g. an error).
        text: Text this token releases: UTF-8 safe, never text a stop string later removes; the
            texts of a request's events add up to its final ``output.text``.
        finished: True on the request's last event.
        output: The complete :class:`GenerationOutput` on the last event, else ``None``.
        logprobs: The token's :class:`~.sampling.TokenLogprobs` when the request asked for them.
        prompt_logprobs: On the event of a request's first token, when it asked for ``prompt_logprobs``: its
            :attr:`GenerationOutput.prompt_logprobs`, so a stream can show the prompt's scores before the answer;
            else ``None``.
    """

    index: int
    request_id: int
    token_id: int | None
    text: str = ""
    finished: bool = False
    output: GenerationOutput | None = None
    logprobs: Any = None
    prompt_logprobs: list[Any] | None = None


@dataclass(frozen=True)
class RunStats:
    """Aggregate numbers of one ``generate_batched`` / ``stream`` run.

    ``step_paths`` maps each way a step ran to ``(steps, seconds)``, the seconds from the forward pass
    through sampling (which waits for the device): ``"cuda graph"`` and ``"fused cpu"`` (decode-only
    steps), ``"decode"`` (decode-only steps run eagerly), ``"fused cpu mixed"`` (steps with a prefill chunk
    through the fused CPU step), ``"mixed"`` (steps with a prefill chunk run eagerly) and
    ``"fused cpu, greedy burst"``, ``"cuda graph, burst"`` and ``"decode, burst"`` (the decode steps after the first
    of a burst, ``num_scheduler_steps > 1``: each counts as a step, the seconds are the burst's).
    ``requests``, ``prompt_tokens``, ``output_tokens`` and ``preemptions`` are over all of the run's requests, those
    that ended with an error at admission included: the sums of their outputs' ``metrics``. ``steps``,
    ``step_paths`` and ``elapsed`` are the generator's while the run went on: a step runs the run's requests
    with any other request of the generator, and counts once.
    """

    requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed: float
    steps: int
    preemptions: int
    step_paths: dict[str, tuple[int, float]] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Generated tokens per second."""
        return self.output_tokens / self.elapsed if self.elapsed > 0 else 0.0


def paths_since(now: dict[str, tuple[int, float]], before: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float]]:
    """Steps and seconds per path added between two snapshots of ``Generator.step_paths``."""
    added = {}
    for path, (steps, seconds) in now.items():
        steps0, seconds0 = before.get(path, (0, 0.0))
        if steps > steps0:
            added[path] = (steps - steps0, seconds - seconds0)
    return added
