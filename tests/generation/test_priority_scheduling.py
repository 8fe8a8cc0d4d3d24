"""vLLM's priority scheduling (``scheduling_policy="priority"``): admission in order of ``(priority, arrival)``, the
preempted request the one of the highest value, nothing lost; under ``"fcfs"`` a priority is refused."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from llmspeed import Generator, SamplingParams
from llmspeed.generation.block_manager import BlockManager
from llmspeed.generation.scheduler import Scheduler
from llmspeed.generation.sequence import Sequence, Status
from tests.generation.test_scheduler import SchedulerMachine, _run_step


def _seq(i: int, n: int, priority: int = 0, max_new: int = 4) -> Sequence:
    seq = Sequence(i, list(range(1, n + 1)), SamplingParams(max_new_tokens=max_new))
    seq.priority = priority
    return seq


def test_waiting_requests_are_admitted_lowest_priority_first_then_in_arrival_order():
    sched = Scheduler(BlockManager(64, 4), max_batch_tokens=64, max_seqs=1, max_seq_len=1000, policy="priority")
    seqs = [_seq(0, 3, 0), _seq(1, 3, -1), _seq(2, 3, 5), _seq(3, 3, -1)]
    for seq in seqs:
        sched.add(seq)
    order = []
    while sched.has_unfinished():
        order += [s.seq_id for s in _run_step(sched)]
    assert order == [1, 3, 0, 2]
    fcfs = Scheduler(BlockManager(64, 4), max_batch_tokens=64, max_seqs=1, max_seq_len=1000)
    for seq in [_seq(0, 3, 0), _seq(1, 3, -1), _seq(2, 3, 5), _seq(3, 3, -1)]:
        fcfs.add(seq)
    order = []
    while fcfs.has_unfinished():
        order += [s.seq_id for s in _run_step(fcfs)]
    assert order == [0, 1, 2, 3]  # fcfs ignores the field (the generator refuses non-zero values under it)


@pytest.mark.parametrize("policy, victim", [("fcfs", 1), ("priority", 0)])
def test_the_preempted_request_is_the_newest_or_the_one_of_the_highest_value(policy, victim):
    sched = Scheduler(BlockManager(4, 4), max_batch_tokens=64, max_seqs=8, max_seq_len=1000, policy=policy)
    a, b = _seq(0, 7, priority=1, max_new=6), _seq(1, 7, priority=0, max_new=6)
    for seq in (a, b):
        sched.add(seq)
    _run_step(sched)
    _run_step(sched)  # 8 tokens each: 2 blocks each, the cache is full
    c = _seq(2, 3, priority=2, max_new=2)
    sched.add(c)
    batch = sched.schedule()  # both need a third block: one is preempted by recompute
    preempted = [a, b][victim]
    assert batch.preempted == [preempted] and preempted.status is Status.WAITING and preempted.num_computed == 0
    # fcfs: back to the head of the queue; priority: at its place in the order, before c (priority 2)
    assert list(sched.waiting) == [preempted, c]


class PrioritySchedulerMachine(SchedulerMachine):
    """The scheduler machine's arrivals with priorities: its invariants hold, and both lists stay in order."""

    def __init__(self):
        super().__init__()
        self.sched = Scheduler(BlockManager(10, 4), max_batch_tokens=12, max_seqs=4, max_seq_len=64, policy="priority")

    @rule(prompt=st.integers(0, 45), max_new=st.integers(1, 12), priority=st.integers(-2, 2))
    def add_with_priority(self, prompt, max_new, priority):
        seq = _seq(len(self.seqs), prompt, priority, max_new)
        self.seqs.append(seq)
        if self.sched.add(seq) is not None:
            self.rejected.add(seq.seq_id)

    @invariant()
    def lists_in_priority_order(self):
        for queue in (list(self.sched.waiting), self.sched.running):
            keys = [(s.priority, s.seq_id) for s in queue]
            assert keys == sorted(keys)


TestPriorityScheduler = PrioritySchedulerMachine.TestCase
TestPriorityScheduler.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


def test_a_generator_runs_prompts_in_priority_order_with_the_tokens_of_fcfs(llama):
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]]
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    want = [o.token_ids for o in Generator(llama, progress=False).generate_batched(prompts, sp)]
    gen = Generator(llama, progress=False, max_seqs=1, scheduling_policy="priority")
    finals = [e.index for e in gen.stream(prompts, sp, priority=[2, 0, 3, -1]) if e.finished]
    assert finals == [3, 1, 0, 2]
    assert [o.token_ids for o in gen.generate_batched(prompts, sp, priority=[2, 0, 3, -1])] == want


def test_bad_priorities_and_policies_are_named(llama):
    with pytest.raises(ValueError, match="scheduling_policy must be one of \\('fcfs', 'priority'\\); got 'lifo'"):
        Generator(llama, progress=False, scheduling_policy="lifo")
    fcfs = Generator(llama, progress=False)
    with pytest.raises(ValueError, match="priority=1 needs scheduling_policy='priority'"):
        fcfs.add_request([1, 2], priority=1)
    with pytest.raises(ValueError, match="priority=1 needs"):
        fcfs.generate_batched([[1, 2], [3]], priority=[0, 1])
    assert fcfs.num_live == 0  # checked before any prompt was queued
    gen = Generator(llama, progress=False, scheduling_policy="priority")
    with pytest.raises(ValueError, match="priority must be an integer .*got 1.5"):
        gen.add_request([1, 2], priority=1.5)
    with pytest.raises(ValueError, match="one integer per prompt \\(2\\); got 1"):
        gen.generate_batched([[1, 2], [3]], priority=[0])
    assert gen.num_live == 0
