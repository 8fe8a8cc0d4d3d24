"""Request lifecycle of the Generator as a hypothesis state machine: random adds, steps, aborts and injected step
faults keep the KV blocks exact and give every request its own tokens, ended once.

Moved from ``test_lifecycle.py`` (issue #15), which keeps the example-based tests.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import llmspeed
from llmspeed import Generator, SamplingParams

_MACHINE_MODEL: list = []  # one tiny Llama for every example of the state machine below
_ALONE: dict = {}  # (prompt, max_new_tokens) -> its greedy tokens run alone


def _alone_cached(prompt, n):
    key = (tuple(prompt), n)
    if key not in _ALONE:
        sp = SamplingParams(max_new_tokens=n, ignore_eos=True)
        _ALONE[key] = Generator(_MACHINE_MODEL[0], progress=False).generate_batched([prompt], sp)[0].token_ids
    return _ALONE[key]


class GeneratorMachine(RuleBasedStateMachine):
    """Random adds (prompts sharing prefixes), steps, aborts in any state and injected step faults on a small block
    pool: blocks and prefix-cache references stay exact, and every request ends once with its own greedy tokens
    (those it gets alone, cut short by an abort, a fault or the cache), preempted or not."""

    BASE = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]

    def __init__(self):
        super().__init__()
        if not _MACHINE_MODEL:
            _MACHINE_MODEL.append(llmspeed.models.tiny("llama", seed=0))
        self.gen = None
        self.meta, self.tokens, self.ends = {}, {}, {}
        self.refused: dict[int, str] = {}  # request -> what its error says
        self.fault_in = 0  # the runner's run raises on this call from now (0: never)

    @initialize(bs=st.sampled_from([2, 4]), nblocks=st.integers(3, 10), mbt=st.integers(1, 16), seqs=st.integers(1, 4),
                prefix=st.booleans(), nss=st.sampled_from([1, 3]), fused=st.sampled_from([None, False]))
    def make(self, bs, nblocks, mbt, seqs, prefix, nss, fused):
        self.gen = Generator(_MACHINE_MODEL[0], progress=False, kv_cache_tokens=bs * nblocks, block_size=bs,
                             max_batch_tokens=mbt, max_seqs=seqs, prefix_caching=prefix, num_scheduler_steps=nss,
                             fused_decode=fused)
        real = self.gen.runner.run

        def run(step):
            self.fault_in -= 1
            if self.fault_in == 0:
                raise RuntimeError("injected fault")
            return real(step)

        self.gen.runner.run = run

    def _take(self, events):
        for e in events:
            assert e.request_id not in self.ends, f"an event after request {e.request_id}'s final one"
            self.tokens[e.request_id] += [e.token_id] if e.token_id is not None else []
            if e.finished:
                self.ends[e.request_id] = e.output

    @rule(cut=st.integers(0, 12), tail=st.lists(st.integers(1, 255), max_size=6), n=st.integers(1, 8))
    def add(self, cut, tail, n):
        prompt = self.BASE[:cut] + tail
        rid = self.gen.add_request(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
        self.meta[rid], self.tokens[rid] = (prompt, n), []
        if not prompt or len(prompt) >= self.gen.blocks.capacity_tokens:  # can never run: refused at once
            self.refused[rid] = "empty" if not prompt else "KV cache budget"

    @rule()
    def step(self):
        self._take(self.gen.step())

    @rule(k=st.integers(1, 3))
    def fault(self, k):
        self.fault_in = k

    @precondition(lambda self: self.meta)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.meta)))
        self.gen.abort(rid)
        self.gen.abort(rid)

    @invariant()
    def blocks_exact(self):
        if self.gen is None:
            return
        bm, sched = self.gen.blocks, self.gen.scheduler
        holders: dict[int, set[int]] = {}
        for s in sched.running:
            assert len(s.block_table) == len(set(s.block_table)) and s.num_computed < s.num_tokens
            for b in s.block_table:
                holders.setdefault(b, set()).add(s.seq_id)
        assert all(not s.block_table for s in sched.waiting)
        assert {b: bm.owners(b) for b in holders} == holders and len(holders) + bm.num_free == bm.num_blocks
        assert not set(bm._evictable) & set(holders) and set(bm._evictable) <= set(bm._key_of)

    def teardown(self):
        if self.gen is None:
            return
        self.fault_in = 0
        for _ in range(5000):
            if not self.gen.has_unfinished():
                break
            self._take(self.gen.step())
        assert not self.gen.has_unfinished() and self.gen.num_live == 0
        assert self.gen.blocks.num_free == self.gen.blocks.num_blocks
        assert sorted(self.ends) == sorted(self.meta)
        for rid, out in self.ends.items():
            prompt, n = self.meta[rid]
            assert out.token_ids == self.tokens[rid] and out.prompt_token_ids == prompt
            if rid in self.refused:
                assert out.finish_reason == "error" and self.refused[rid] in out.error and not out.token_ids
            else:
                assert out.finish_reason in ("length", "abort") or "injected fault" in out.error, out.error
            assert out.token_ids == _alone_cached(prompt, n)[: len(out.token_ids)]
            if out.finish_reason == "length" and len(out.token_ids) < n:
                assert len(prompt) + len(out.token_ids) == self.gen.scheduler.max_tokens_per_seq


TestGeneratorMachine = GeneratorMachine.TestCase


TestGeneratorMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
