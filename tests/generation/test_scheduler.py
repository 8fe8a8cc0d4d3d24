"""The scheduler without a model: policy unit tests and a hypothesis state machine."""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmspeed.generation.block_manager import BlockManager
from llmspeed.generation.sampling import SamplingParams
from llmspeed.generation.scheduler import Scheduler
from llmspeed.generation.sequence import Sequence, Status


def _seq(i: int, n: int, max_new: int = 4) -> Sequence:
    return Sequence(i, list(range(1, n + 1)), SamplingParams(max_new_tokens=max_new))


def _run_step(sched: Scheduler, rng: random.Random | None = None) -> list[Sequence]:
    """Play the engine: commit the batch, append a token to sampled sequences, finish the done ones."""
    batch = sched.schedule()
    sched.commit(batch)
    finished = []
    for chunk in batch.chunks:
        if chunk.samples:
            seq = chunk.seq
            seq.output_ids.append(7)
            if len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= sched.max_tokens_per_seq:
                sched.finish(seq, "length")
                finished.append(seq)
    return finished


def test_decode_first_then_chunked_prefill_within_budget():
    sched = Scheduler(BlockManager(64, 4), max_batch_tokens=8, max_seqs=8, max_seq_len=1000)
    a, b = _seq(0, 3), _seq(1, 20)
    sched.add(a)
    _run_step(sched)  # a prefilled, has its first token
    sched.add(b)
    batch = sched.schedule()
    assert [(c.seq.seq_id, c.length) for c in batch.chunks] == [(0, 1), (1, 7)]
    assert not batch.chunks[1].samples
    sched.commit(batch)
    assert b.num_computed == 7 and len(b.block_table) == 5  # blocks for the whole prompt at admission


def test_admission_waits_for_blocks_and_preemption_recomputes():
    sched = Scheduler(BlockManager(4, 4), max_batch_tokens=64, max_seqs=8, max_seq_len=1000)
    a, b = _seq(0, 7, max_new=6), _seq(1, 7, max_new=6)
    sched.add(a)
    sched.add(b)
    _run_step(sched)
    assert a.status is Status.RUNNING and b.status is Status.RUNNING
    _run_step(sched)  # 8 tokens each: 2 blocks each, the cache is full
    c = _seq(2, 3, max_new=2)
    sched.add(c)  # arrives before the preemption: it waits for blocks
    batch = sched.schedule()  # both need a third block: the newest (b) is preempted by recompute
    assert batch.preempted == [b] and b.status is Status.WAITING and b.num_computed == 0
    assert [c.seq for c in batch.chunks] == [a] and not b.block_table
    assert list(sched.waiting) == [b, c]  # back to the front of the queue: admitted before later arrivals
    sched.commit(batch)
    a.output_ids.append(7)
    while sched.has_unfinished():
        _run_step(sched)
    assert a.finish_reason == b.finish_reason == c.finish_reason == "length"
    assert len(a.output_ids) == len(b.output_ids) == 6 and len(c.output_ids) == 2
    assert sched.blocks.num_free == 4


def test_requests_that_can_never_fit_are_rejected():
    sched = Scheduler(BlockManager(4, 4), max_batch_tokens=64, max_seqs=8, max_seq_len=10)
    assert "context" in sched.add(_seq(0, 10))
    sched2 = Scheduler(BlockManager(2, 4), max_batch_tokens=64, max_seqs=8, max_seq_len=100)
    assert "KV cache" in sched2.add(_seq(0, 8))
    assert "empty" in sched2.add(_seq(1, 0))
    assert not sched.has_unfinished() and not sched2.has_unfinished()


def test_a_lone_sequence_that_fills_the_cache_ends_with_length():
    sched = Scheduler(BlockManager(2, 4), max_batch_tokens=64, max_seqs=8, max_seq_len=100)
    seq = _seq(0, 3, max_new=50)
    sched.add(seq)
    while sched.has_unfinished():
        _run_step(sched)
    assert seq.num_tokens == 8 and seq.finish_reason == "length"


def test_admission_stops_at_max_seqs_and_resumes_when_one_finishes():
    """Room for all in blocks and tokens: only ``max_seqs`` run; the next one is admitted when a slot frees up.
    (The state machine's invariant rarely reaches a full house with blocks to spare.)"""
    sched = Scheduler(BlockManager(64, 4), max_batch_tokens=64, max_seqs=3, max_seq_len=1000)
    seqs = [_seq(i, 2, max_new=1 + i) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    assert _run_step(sched) == [seqs[0]]  # three prefilled, each got a token; the first is done
    assert sched.running == seqs[1:3] and list(sched.waiting) == seqs[3:]
    assert [c.seq for c in sched.schedule().chunks] == seqs[1:4] and list(sched.waiting) == seqs[4:]


def test_decodes_stay_within_the_token_budget():
    sched = Scheduler(BlockManager(64, 4), max_batch_tokens=64, max_seqs=8, max_seq_len=1000)
    seqs = [_seq(i, 2, max_new=10) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    _run_step(sched)  # all three prefilled: each decodes one token next
    sched.max_batch_tokens = 2
    batch = sched.schedule()
    assert batch.num_tokens == 2 and [c.seq for c in batch.chunks] == seqs[:2]


def test_a_request_that_cannot_be_admitted_keeps_its_place_at_the_head_of_the_queue():
    """First come, first served: a later, smaller request that would fit does not overtake it."""
    sched = Scheduler(BlockManager(4, 4), max_batch_tokens=64, max_seqs=8, max_seq_len=1000)
    a, big, small = _seq(0, 7, max_new=2), _seq(1, 12), _seq(2, 3)
    sched.add(a)
    _run_step(sched)  # a holds 2 of the 4 blocks
    sched.add(big)  # needs 3 blocks
    sched.add(small)  # would fit in 1
    batch = sched.schedule()
    assert [c.seq for c in batch.chunks] == [a] and list(sched.waiting) == [big, small]


def test_a_request_readmitted_with_fewer_cached_blocks_registers_its_blocks_again():
    """Preempted, its first block is evicted: readmitted with no hit, it recomputes and caches its blocks anew."""
    params = SamplingParams(max_new_tokens=10)
    sched = Scheduler(BlockManager(4, 2, prefix_caching=True), max_batch_tokens=64, max_seqs=8, max_seq_len=1000)
    a, b = Sequence(0, [1, 2, 3], params), Sequence(1, [4, 5, 6], params)
    sched.add(a)
    sched.add(b)
    while sched.has_unfinished():
        _run_step(sched)  # b is preempted for a; a takes b's first (least recently used) block
    assert b.num_preemptions == 1 and b.num_cached == 0
    hits = sched.blocks.match(b.all_tokens(), (b.adapter_key, b.weights_key))
    assert len(hits) == (b.num_tokens - 1) // 2  # every full block b computed is cached


def test_tokens_left_is_bounded_by_max_new_tokens_and_by_the_sequence_limit():
    seq = _seq(0, 3, max_new=10)
    assert seq.tokens_left(100) == 10 and seq.tokens_left(8) == 5
    seq.output_ids += [7, 7]
    assert seq.tokens_left(100) == 8 and seq.tokens_left(8) == 3


def test_a_chunked_prefill_continues_within_the_token_budget():
    sched = Scheduler(BlockManager(64, 4), max_batch_tokens=4, max_seqs=8, max_seq_len=1000)
    seq = _seq(0, 10)
    sched.add(seq)
    lengths = []
    while not seq.output_ids:
        batch = sched.schedule()
        lengths.append(batch.num_tokens)
        sched.commit(batch)
        if batch.chunks[0].samples:
            seq.output_ids.append(7)
    assert lengths == [4, 4, 2]


def test_a_token_budget_below_max_seqs_caps_the_running_sequences_and_starves_none():
    rng = random.Random(0)
    sched = Scheduler(BlockManager(256, 4), max_batch_tokens=3, max_seqs=8, max_seq_len=1000)
    seqs = [_seq(i, rng.randint(1, 9), max_new=rng.randint(1, 6)) for i in range(10)]
    for seq in seqs:
        assert sched.add(seq) is None
    for _ in range(200):
        if not sched.has_unfinished():
            break
        running = list(sched.running)
        batch = sched.schedule()
        assert len(sched.running) <= 3 and batch.num_tokens <= 3
        assert {c.seq.seq_id for c in batch.chunks} >= {s.seq_id for s in running}  # every running one steps
        sched.commit(batch)
        for chunk in batch.chunks:
            if chunk.samples:
                chunk.seq.output_ids.append(7)
                if len(chunk.seq.output_ids) >= chunk.seq.params.max_new_tokens:
                    sched.finish(chunk.seq, "length")
    assert all(s.finish_reason == "length" and len(s.output_ids) == s.params.max_new_tokens for s in seqs)


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, aborts and steps: blocks are never leaked or shared; every request ends once."""

    def __init__(self):
        super().__init__()
        self.sched = Scheduler(BlockManager(10, 4), max_batch_tokens=12, max_seqs=4, max_seq_len=64)
        self.seqs: list[Sequence] = []
        self.finished: list[int] = []
        self.rejected: set[int] = set()

    @rule(prompt=st.integers(0, 45), max_new=st.integers(1, 12))
    def add(self, prompt, max_new):
        seq = _seq(len(self.seqs), prompt, max_new)
        self.seqs.append(seq)
        if self.sched.add(seq) is not None:
            self.rejected.add(seq.seq_id)

    @rule()
    def step(self):
        self.finished += [s.seq_id for s in _run_step(self.sched)]

    @precondition(lambda self: any(s.status is not Status.FINISHED and s.seq_id not in self.rejected for s in self.seqs))
    @rule(data=st.data())
    def abort(self, data):
        live = [s for s in self.seqs if s.status is not Status.FINISHED and s.seq_id not in self.rejected]
        seq = data.draw(st.sampled_from(live))
        self.sched.finish(seq, "abort")
        self.finished.append(seq.seq_id)

    @invariant()
    def blocks_partitioned(self):
        bm = self.sched.blocks
        held = [b for s in self.sched.running for b in s.block_table]
        assert len(held) == len(set(held))
        assert len(held) + bm.num_free == bm.num_blocks
        assert all(not s.block_table for s in self.sched.waiting)
        assert all(bm.owner(b) == s.seq_id for s in self.sched.running for b in s.block_table)
        assert len(self.sched.running) <= self.sched.max_seqs

    @invariant()
    def each_request_in_exactly_one_place(self):
        assert len(self.finished) == len(set(self.finished))
        places = [s.seq_id for s in self.sched.running] + [s.seq_id for s in self.sched.waiting] + self.finished
        assert sorted(places + sorted(self.rejected)) == list(range(len(self.seqs)))

    def teardown(self):
        for _ in range(2000):
            if not self.sched.has_unfinished():
                break
            self.step()
        assert not self.sched.has_unfinished(), "requests left behind"
        assert self.sched.blocks.num_free == self.sched.blocks.num_blocks
        for s in self.seqs:
            if s.seq_id not in self.rejected and s.finish_reason == "length":
                assert len(s.output_ids) == s.params.max_new_tokens or s.num_tokens >= self.sched.max_tokens_per_seq


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
