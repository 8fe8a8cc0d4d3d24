"""Iteration-level scheduler (Orca / vLLM style), pure Python and testable without a model.

Every step it builds one ragged batch under a token budget:

1. **decode first**: each running sequence whose prompt is in the cache gets its one new token;
   when the cache has no block for it, the most recently admitted running sequence is
   *preempted by recompute* (its blocks are freed, it goes back to the front of the queue and
   recomputes prompt + generated tokens when readmitted);
2. **then prefill**: running sequences in the middle of a long prompt continue (chunked prefill),
   then waiting sequences are admitted first-come first-served, only when the free list holds
   blocks for all their tokens, as long as token budget and sequence slots remain. With prefix
   caching a sequence is admitted with the cached blocks of its longest cached prefix and starts
   computing after them.

With ``policy="priority"`` (vLLM's ``--scheduling-policy priority``) both lists are kept in order of
``(priority, arrival)``, lower first: the waiting request of the lowest value is admitted first, decode and
chunked prefill serve running requests in that order, and the preempted one is the running request of the
highest value (the newest among equals), which goes back into the queue at its place in that order. With equal
priorities that is exactly first-come first-served.

Nothing is ever dropped: a request leaves only through :meth:`Scheduler.finish` or
:meth:`Scheduler.abort`, and requests that can never fit are rejected at :meth:`Scheduler.add`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager, blocks_for
from .sequence import Sequence, Status

POLICIES = ("fcfs", "priority")  # vLLM's --scheduling-policy values


@dataclass(frozen=True)
class Chunk:
    """``length`` tokens of ``seq`` starting at position ``start`` go through the model this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits give a new token."""
        return self.start + self.length == self.seq.num_tokens


@dataclass
class Batch:
    """One step's work: single-token chunks (decodes) first, then longer prefill chunks."""

    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens in the flat batch."""
        return sum(c.length for c in self.chunks)


class Scheduler:
    """Decides which tokens run each step; owns the waiting queue and the running list.

    Args:
        blocks: The KV block allocator.
        max_batch_tokens: Most tokens (decode + prefill) in one step.
        max_seqs: Most sequences running at once. A sequence is admitted only while the step's token budget has
            room for it, so every running sequence gets tokens every step: with ``max_batch_tokens < max_seqs`` at most
            ``max_batch_tokens`` sequences run at once and the others wait in the queue (vLLM refuses that pair).
        max_seq_len: Longest sequence the model supports (prompt + output).
        policy: ``"fcfs"`` (first come, first served) or ``"priority"`` (lower ``Sequence.priority`` first).
    """

    def __init__(self, blocks: BlockManager, max_batch_tokens: int, max_seqs: int, max_seq_len: int,
                 policy: str = "fcfs"):  # fmt: skip
        if policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {POLICIES}; got {policy!r}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1; got {max_batch_tokens}")
        if max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1; got {max_seqs}")
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.max_seq_len = max_seq_len
        self.policy = policy
        self.context_note = ""  # why the context is max_seq_len, when it is not the model's positions (the engine's)
        # with prefix caching: what the model's keys and values depend on now (its weights), read at most once per
        # step, when it admits: a sequence's blocks are keyed by it, so blocks of other weights are never reused
        self.weights_key: Callable[[], object] = lambda: None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def max_tokens_per_seq(self) -> int:
        """Longest sequence this scheduler can ever hold: the model's context or the whole cache."""
        return min(self.max_seq_len, self.blocks.capacity_tokens)

    def has_unfinished(self) -> bool:
        """True while some request is waiting or running."""
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> str | None:
        """Queue ``seq``; return an error message (and queue nothing) when it can never run."""
        n = seq.num_tokens
        if n == 0:
            return "the prompt is empty; give at least one token"
        if n >= self.max_seq_len:
            return (f"the prompt has {n} tokens; the model's context holds {self.max_seq_len}{self.context_note} "
                    f"(prompt + at least one new token)")  # fmt: skip
        if n >= self.blocks.capacity_tokens:
            return (
                f"the prompt has {n} tokens; the KV cache budget holds {self.blocks.capacity_tokens} "
                f"(prompt + at least one new token); raise kv_cache_tokens"
            )
        seq.status = Status.WAITING
        self._place(self.waiting, seq)
        return None

    def _place(self, queue: deque[Sequence] | list[Sequence], seq: Sequence, front: bool = False) -> None:
        """Put ``seq`` into ``queue``: under "fcfs" at its end (``front``: its front, a preempted request's place);
        under "priority" at its place in ``(priority, seq_id)`` order, after every entry not above it."""
        if self.policy == "fcfs":
            queue.insert(0 if front else len(queue), seq)
            return
        key = (seq.priority, seq.seq_id)
        at = next((i for i, other in enumerate(queue) if (other.priority, other.seq_id) > key), len(queue))
        queue.insert(at, seq)

    def _admit(self, seq: Sequence, weights: list[object]) -> bool:
        tokens = seq.all_tokens()
        if self.blocks.prefix_caching:
            if not weights:
                key = self.weights_key()  # first: reading it may reset the prefix cache (a new epoch)
                weights.append((self.blocks.epoch, key))
            seq.weights_key = weights[0]
        # a request that still needs its prompt's log-probabilities runs the whole prompt: no cached block
        hits = [] if seq.needs_prompt_logprobs else self.blocks.match(tokens, (seq.adapter_key, seq.weights_key))
        if not self.blocks.can_admit(hits, len(tokens)):
            return False
        self.blocks.admit(seq.seq_id, seq.block_table, hits, len(tokens))
        seq.num_computed = len(hits) * self.blocks.block_size
        seq.num_cached = min(seq.num_computed, len(seq.prompt_ids))  # readmitted after a preemption: outputs hit too
        del seq.block_keys[len(hits) :]
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished with ``reason`` and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.seq_id, seq.block_table)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.seq_id, seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._place(self.waiting, seq, front=True)

    def schedule(self) -> Batch:
        """Build the next step's batch (decode first, then chunked prefill and admission)."""
        batch = Batch()
        budget = self.max_batch_tokens
        scheduled: set[int] = set()

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or not seq.is_decoding:
                continue
            while not self.blocks.can_grow(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq.seq_id, seq.block_table, seq.num_tokens)
            batch.chunks.append(Chunk(seq, seq.num_computed, 1))
            scheduled.add(seq.seq_id)
            budget -= 1

        for seq in self.running:
            if budget == 0:
                break
            if seq.seq_id in scheduled or seq.num_pending == 0:
                continue
            length = min(seq.num_pending, budget)
            batch.chunks.append(Chunk(seq, seq.num_computed, length))
            budget -= length

        weights: list[object] = []  # the weights key, read at the first admission
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs and not batch.preempted:
            seq = self.waiting[0]
            if not self._admit(seq, weights):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self._place(self.running, seq)  # under "priority" kept in order: the last one is the one to preempt
            length = min(seq.num_pending, budget)
            batch.chunks.append(Chunk(seq, seq.num_computed, length))
            budget -= length
        # single-token chunks first: the attention backend runs them as one batched decode
        batch.chunks.sort(key=lambda c: c.length != 1)
        return batch

    def commit(self, batch: Batch) -> None:
        """Record that the batch's tokens are now in the cache (and register full blocks for prefix caching)."""
        for chunk in batch.chunks:
            seq = chunk.seq
            seq.num_computed = chunk.start + chunk.length
            if self.blocks.prefix_caching and seq.num_computed // self.blocks.block_size > len(seq.block_keys):
                self.blocks.register(seq.block_table, seq.all_tokens(), seq.num_computed,
                                     (seq.adapter_key, seq.weights_key), seq.block_keys)  # fmt: skip


def blocks_held(scheduler: Scheduler) -> int:
    """Distinct blocks held by running sequences (for invariants in tests)."""
    return len({b for s in scheduler.running for b in s.block_table})


__all__ = ["POLICIES", "Batch", "Chunk", "Scheduler", "blocks_for", "blocks_held"]
