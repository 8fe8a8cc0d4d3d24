"""Bursts of decode steps (vLLM's multi-step scheduling): after a decode step, up to ``num_scheduler_steps - 1``
more decode steps of the same batch, run back to back by :meth:`.runner.ModelRunner.burst_steps`, without the
scheduling and detokenizing between them: greedy requests in one C++ call on the fused CPU path; elsewhere greedy
and randomly sampled requests alike, each step's tokens sampled on the device and fed to the next step there.

:func:`burst_length` is the policy (pure Python, no model); :func:`greedy_burst` runs one through a
:class:`~.engine.Generator` and turns its tokens into that step's events.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .sampler import sample_ids
from .scheduler import Batch, Chunk

if TYPE_CHECKING:
    import torch

    from .block_manager import BlockManager
    from .engine import Generator
    from .outputs import StreamEvent
    from .scheduler import Scheduler
    from .sequence import Sequence as Seq


BURST_PATHS = ("fused cpu", "cuda graph", "decode")
"""The paths of a decode-only step (:meth:`.runner.ModelRunner.run`) that a burst may follow."""


def past_ends(device: torch.device) -> bool:
    """Whether a burst on ``device`` runs on past a request's last token (dropping what it computes there) for the
    requests with more tokens left: on a GPU a row of a decode step costs next to nothing, and a burst that stopped
    at the first request's end would be a step or two long in a big batch of mixed lengths; on the CPU each row
    costs its share of the step."""
    return device.type != "cpu"


def burst_length(seqs: Sequence[Seq], scheduler: Scheduler, blocks: BlockManager, num_scheduler_steps: int,
                 past_end: bool = False, sampled: bool = False) -> int:  # fmt: skip
    """How many more decode steps of ``seqs`` (the batch a decode step just ran) may run back to back.

    None (0) unless every running request is in the batch, none is waiting, and each is greedy (or, with
    ``sampled``, samples at random) without logprobs, penalties or a pending ``min_tokens``; else as many as
    ``num_scheduler_steps - 1``, every request's tokens left (with ``past_end``: the most any request has left,
    each within the context), and the free blocks allow.
    """
    if scheduler.waiting or len(seqs) != len(scheduler.running):
        return 0
    for seq in seqs:
        p = seq.params
        if seq.is_finished or not (p.greedy or sampled) or p.logprobs is not None or p.penalized \
                or len(seq.output_ids) < p.min_tokens:  # fmt: skip
            return 0
    limit = scheduler.max_tokens_per_seq
    left = [seq.tokens_left(limit) for seq in seqs]
    room = min(limit - seq.num_tokens for seq in seqs)  # every row computes every step of the burst
    steps = min(num_scheduler_steps - 1, max(left) if past_end else min(left), room)
    while steps > 0 and sum(blocks.blocks_needed(s.block_table, s.num_tokens + steps - 1) for s in seqs) > blocks.num_free:
        steps -= 1
    return steps


def greedy_burst(gen: Generator, batch: Batch, events: list[StreamEvent], path: str = "fused cpu") -> None:
    """Up to ``num_scheduler_steps - 1`` more decode steps of ``batch``, which just ran on ``path`` (one of
    :data:`BURST_PATHS`), run back to back by the runner (their events appended to ``events``; their time recorded as
    ``"fused cpu, greedy burst"``, or ``f"{path}, burst"`` with each step's own path on the paths that also sample at
    random: ``"decode, burst"`` for the steps a CUDA graph did not run).

    As many steps as :func:`burst_length` allows, where the runner says it can run them (the blocks are taken first,
    so nothing is preempted; given back if the runner still declines the burst). The tokens then go through the same
    commit, stop checks and detokenizing as one step's; a request that ends part way drops the tokens computed after
    its end.
    """
    seqs = [c.seq for c in batch.chunks]
    # sampled on the device (random rows drawing from their generators), or, after a fused CPU step, argmaxes in C++;
    # a step the fused step left to forward_batch has its burst there too
    device = path != "fused cpu"
    steps = burst_length(seqs, gen.scheduler, gen.blocks, gen.num_scheduler_steps, past_ends(gen.device), device)
    adapters = [s.params.adapter for s in seqs]
    routed = adapters if any(a is not None for a in adapters) else None
    random = any(not s.params.greedy for s in seqs)
    if steps < 1 or not gen.runner.burst_ready(len(seqs), routed, random, fused=not device):
        return  # asked first: the blocks taken below can evict prefix-cache blocks, which giving them back does not restore
    held = [len(seq.block_table) for seq in seqs]
    for seq in seqs:  # the cache slots of every position the burst writes
        gen.blocks.grow(seq.seq_id, seq.block_table, seq.num_tokens + steps - 1)
    start = time.perf_counter()
    rows = [(s.block_table, s.num_computed, s.output_ids[-1]) for s in seqs]
    params, generators = [s.params for s in seqs], [s.generator for s in seqs]

    def sample(logits: torch.Tensor) -> torch.Tensor:  # [n, V] -> [n]: what the step's sampler picks
        return sample_ids(logits, params, generators)

    burst = gen.runner.burst_steps(rows, steps, routed, sample if random else None, fused=not device)
    if burst is None:  # the runner cannot run these steps back to back (e.g. the fused step ran the step, but its C++
        # loop cannot compute a dynamic rotary's rows): the next step() goes on one step at a time; the blocks taken
        # above go back, else they would be held for tokens many steps away, and admissions wait for them
        for seq, n in zip(seqs, held):
            gen.blocks.release(seq.seq_id, seq.block_table[n:])
            del seq.block_table[n:]
        return
    gen.num_steps += steps
    gen.num_tokens_computed += steps * len(seqs)
    now = start
    try:
        for step_tokens, now in burst:  # on a GPU, each step's tokens as it finishes, while the later ones run
            for seq, token in zip(seqs, step_tokens):
                if seq.is_finished:
                    continue
                gen.scheduler.commit(Batch([Chunk(seq, seq.num_computed, 1)]))
                seq.output_ids.append(token)
                seq.token_times.append(now)
                events.append(gen._token_event(seq, token, None, events))
    finally:  # counted in num_steps above: recorded even when a read-back or a detokenizer raises part way
        # timed until its last tokens were known, as a step is; each step under its own path (a step a CUDA graph did
        # not run is a "decode" step), the burst's time shared by steps
        for step_path, n in Counter(gen.runner.burst_paths).items():
            label = f"{step_path}, burst" if device else "fused cpu, greedy burst"
            gen._record(label, now - (now - start) * n / steps, n, end=now)


__all__ = ["burst_length", "greedy_burst"]
