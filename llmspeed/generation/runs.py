"""Whole runs over a :class:`~.engine.Generator`: ``generate_batched`` and ``stream`` add their prompts, step, and
read back only their own requests' events.

Events of other requests (added with ``add_request``, or another run's) are kept in the generator's queue for
whoever steps next; a run whose consumer stops early aborts its unfinished requests and discards their events.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, SupportsIndex, cast

from .admission import check_priority
from .outputs import RunStats, StreamEvent, paths_since
from .prompts import Prompt, is_chat, is_token_id
from .sampling import sampling_list

if TYPE_CHECKING:
    from .engine import Generator


def add_all(gen: Generator, prompts: Sequence[Prompt], sampling: Any, priority: Sequence[int] | None = None) -> list[int]:
    """Queue every prompt of a run (``index`` = its position; ``priority[i]`` its priority); return their request ids.

    Raises:
        TypeError: ``prompts`` is one prompt (a string, bytes, a chat, or a list of token ids), not a list of them.
        ValueError: ``priority`` is not one integer per prompt (checked before any prompt is queued).
    """
    if isinstance(prompts, (str, bytes, bytearray)) or is_chat(prompts):
        raise TypeError("prompts must be a list of prompts; got a single string, bytes or chat (wrap it in a list)")
    if len(prompts) and all(is_token_id(p) for p in prompts):  # ints, or a 1-D tensor / array's elements
        ids = [int(cast(SupportsIndex, p)) for p in list(prompts)[:8]]  # each one passed is_token_id
        raise TypeError(
            f"prompts must be a list of prompts; got a single list of token ids {ids} "
            f"(wrap it in a list: [[1, 2, 3]])"
        )
    params = sampling_list(sampling, len(prompts))
    ranks = [0] * len(prompts) if priority is None else list(priority)
    if len(ranks) != len(prompts):
        raise ValueError(f"priority must give one integer per prompt ({len(prompts)}); got {len(ranks)}")
    for rank in ranks:
        check_priority(rank, gen.scheduler.policy)
    return [gen.add_request(p, s, index=i, priority=r) for i, (p, s, r) in enumerate(zip(prompts, params, ranks))]


def run_events(gen: Generator, prompts: Sequence[Prompt], sampling: Any,
               priority: Sequence[int] | None = None) -> Iterator[StreamEvent]:  # fmt: skip
    """Step ``gen`` until this run's own requests end, yielding only their events; ``gen.stats`` is set at the end.

    Events of other requests (added with ``add_request``, or another run's) are kept for whoever
    steps next. If the consumer stops early, this run's unfinished requests are aborted and dropped.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    steps0, paths0 = gen.num_steps, dict(gen.step_paths)
    rids = add_all(gen, prompts, sampling, priority)
    mine = set(rids)
    gen._run_rids |= mine  # a step() called from outside while this run is read leaves them its events
    seqs = [gen._seqs[r] for r in rids if r in gen._seqs]
    # requests refused at admission already ended (their events wait in _pending): their prompts count too
    refused = [e.output for e in gen._pending if e.finished and e.request_id in mine and e.output is not None]
    open_ = set(rids)
    out_tokens = 0
    bar = tqdm(total=len(rids), unit="req", disable=not gen.progress, desc="generate", leave=False)
    try:
        while open_:
            ours: list[StreamEvent] = []
            others: list[StreamEvent] = []
            gen._run_stepping = True
            try:
                stepped = gen.step()
            finally:
                gen._run_stepping = False
            for event in stepped:
                (ours if event.request_id in mine else others).append(event)
            gen._pending.extend(others)  # before any yield: a run stepped meanwhile finds them, in order
            for event in ours:
                out_tokens += event.token_id is not None
                if event.finished:
                    open_.discard(event.request_id)
                    bar.update(1)
                yield event
            bar.set_postfix(tok_s=f"{out_tokens / max(time.perf_counter() - start, 1e-9):.1f}", refresh=False)
    finally:
        bar.close()
        gen._run_rids -= mine
        if open_:
            drop(gen, open_)
        gen.stats = RunStats(
            requests=len(rids),
            prompt_tokens=sum(len(s.prompt_ids) for s in seqs) + sum(o.metrics.prompt_tokens for o in refused),
            output_tokens=sum(len(s.output_ids) for s in seqs),
            elapsed=time.perf_counter() - start,
            steps=gen.num_steps - steps0,
            preemptions=sum(s.num_preemptions for s in seqs),  # its own, not other requests' preempted meanwhile
            step_paths=paths_since(gen.step_paths, paths0),
        )


def drop(gen: Generator, rids: set[int]) -> None:
    """Abort ``rids`` and discard their events (their consumer is gone)."""
    with gen._exclusive("abort"):
        for rid in rids:
            seq = gen._seqs.get(rid)
            if seq is not None:
                gen._end(seq, "abort", report=False)
        kept = [e for e in gen._take_pending() if e.request_id not in rids]
        gen._pending.extend(kept)


__all__ = ["add_all", "run_events", "drop"]
