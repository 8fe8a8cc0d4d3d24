"""What a :class:`~.engine.Generator` step makes of its sequences: a token's event, a request's end, a failed batch.

:func:`sampling_rows` gives each sampled request its row's context (ending alone one whose context raises);
:func:`append_tokens` gives a step's sequences their sampled tokens; :func:`token_event` turns one token into its
:class:`~.outputs.StreamEvent` (the final one when the request ends with it); :func:`end_request` finishes a request and releases it; :func:`fail_batch` ends the requests of a
step that raised; :func:`record_path` adds a step's time to ``step_paths``. The generator's ``_token_event``,
``_end``, ``_fail`` and ``_record`` call them (:mod:`.greedy_burst` and :mod:`.runs` reach them through those).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .outputs import StreamEvent

if TYPE_CHECKING:
    from .engine import Generator
    from .scheduler import Batch
    from .sequence import Sequence as Seq

STEP_FAILED = "the step running this request raised"  # how the error of a request whose step raised begins


def step_error(exc: BaseException) -> str:
    """The error of a request whose step raised ``exc``: :data:`STEP_FAILED`, the exception's type and message."""
    return f"{STEP_FAILED} {type(exc).__name__}: {exc}"


def fail_batch(gen: Generator, batch: Batch, exc: BaseException) -> list[StreamEvent]:
    """End every unfinished request of ``batch`` with ``"error"`` (the step raised ``exc``); return their events."""
    message = step_error(exc)
    events = []
    for chunk in batch.chunks:
        seq = chunk.seq
        if not seq.is_finished:
            seq.error = message
            events.append(gen._end(seq, "error", report=False))
    return events


def sampling_rows(gen: Generator, seqs: list[Seq], logits: Any, events: list[StreamEvent]) -> tuple[list[Seq], Any, list[Any]]:
    """``seqs`` (the step's sampled requests, one row of ``logits`` ``[N, V]`` each) with their
    :class:`~.sampling.RowContext` (bans, penalties, structured-output masks). A request whose context raises (its
    grammar matcher failing) ends alone with ``"error"`` (its event appended to ``events``) and its row is dropped:
    the others of the step sample as they would have."""
    kept, rows, contexts = [], [], []
    for i, seq in enumerate(seqs):
        try:
            contexts.append(seq.row_context(gen.eos_token_ids))
        except Exception as exc:
            seq.error = f"choosing its next token raised {type(exc).__name__}: {exc}"
            events.append(gen._end(seq, "error", report=False))
            continue
        kept.append(seq)
        rows.append(i)
    return kept, (logits if len(kept) == len(seqs) else logits[rows]), contexts  # [len(kept), V]


def token_event(gen: Generator, seq: Seq, token: int, lp: Any, events: list[StreamEvent]) -> StreamEvent:
    """The event of ``seq``'s new ``token`` (its final one when the request ends with it).

    When detokenizing the token raises, the step fails its batch (:func:`fail_batch`), but this request's final event,
    appended to ``events`` first, carries the token: its streamed ids stay its output's ``token_ids``.
    """
    try:
        reason, text = seq.advance(token, gen.eos_token_ids, gen.scheduler.max_tokens_per_seq)
    except Exception as exc:
        seq.error = step_error(exc)
        events.append(gen._end(seq, "error", token, report=False, logprobs=lp))
        raise
    if reason is None:
        return StreamEvent(seq.index, seq.seq_id, token, text, logprobs=lp, prompt_logprobs=seq.first_prompt_logprobs())
    return gen._end(seq, reason, token, text, report=False, logprobs=lp)


def append_tokens(gen: Generator, seqs: list[Seq], tokens: list[int], logprobs: list[Any], now: float,
                  events: list[StreamEvent]) -> None:
    """Give each of ``seqs`` its sampled token (and logprobs, timed ``now``); append their events to ``events``."""
    for seq, token, lp in zip(seqs, tokens, logprobs):
        seq.output_ids.append(token)
        seq.token_times.append(now)
        if lp is not None:
            seq.logprobs.append(lp)
        events.append(gen._token_event(seq, token, lp, events))


def record_path(step_paths: dict[str, tuple[int, float]], path: str, start: float, count: int = 1,
                end: float | None = None) -> float:
    """Add ``count`` steps of ``path`` begun at ``start`` and ended at ``end`` (default: now) to ``step_paths``; return
    the end."""
    now = time.perf_counter() if end is None else end
    steps, seconds = step_paths.get(path, (0, 0.0))
    step_paths[path] = (steps + count, seconds + now - start)
    return now


def end_request(gen: Generator, seq: Seq, reason: str, token: int | None = None, text: str = "", report: bool = True,
                logprobs: Any = None) -> StreamEvent:
    """Finish ``seq`` and release it; its final event (with the rest of its text) is returned or queued."""
    gen.scheduler.finish(seq, reason)
    event = seq.final_event(reason, token, text, logprobs)
    gen._seqs.pop(seq.seq_id, None)
    if report:
        gen._pending.append(event)
    return event


__all__ = ["STEP_FAILED", "append_tokens", "end_request", "fail_batch", "record_path", "sampling_rows", "step_error",
           "token_event"]
