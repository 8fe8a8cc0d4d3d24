"""The paged KV allocator: unit tests and a hypothesis state machine (no leaks, no sharing)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmspeed.generation.block_manager import BlockManager, blocks_for


def test_grow_and_release():
    bm = BlockManager(4, 16)
    table: list[int] = []
    bm.grow(7, table, 17)
    assert len(table) == 2 and bm.num_free == 2 and all(bm.owner(b) == 7 for b in table)
    assert not bm.can_grow(table, 16 * 5)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.grow(7, table, 16 * 5)
    assert len(table) == 2  # nothing allocated on failure
    bm.release(7, table)
    assert table == [] and bm.num_free == 4


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_cached_blocks_are_evicted_least_recently_used_first():
    """Never-used blocks go first, then the cached block whose last holder left longest ago; a hit refreshes it."""
    bm = BlockManager(4, 2, prefix_caching=True)

    def run(seq, tokens):  # admit, compute every token, register, release: leaves its full blocks cached
        table = []
        bm.admit(seq, table, bm.match(tokens), len(tokens))
        bm.register(table, tokens, len(tokens), None, [])
        bm.release(seq, table)

    run(0, [1, 1, 9])
    run(1, [2, 2, 9])
    run(2, [1, 1, 8])  # hits [1, 1]: now the more recently used of the two cached blocks
    assert bm.num_cached == 2 and bm.num_free == 4
    assert bm.hit_tokens == 2 and bm.query_tokens == 9 and bm.hit_rate == pytest.approx(2 / 9)
    table: list[int] = []
    bm.grow(3, table, 2 * 2 + 1)  # three blocks: the two never-used ones, then one cached
    assert bm.match([2, 2, 9]) == [] and len(bm.match([1, 1, 9])) == 1
    bm.release(3, table)


def test_release_by_a_sequence_that_does_not_hold_the_block_raises():
    bm = BlockManager(4, 2, prefix_caching=True)
    first: list[int] = []
    bm.admit(1, first, [], 3)
    bm.register(first, [1, 2, 3], 3, None, [])
    second: list[int] = []
    bm.admit(2, second, bm.match([1, 2, 3]), 3)  # shares the first block
    assert bm.owners(first[0]) == {1, 2}
    with pytest.raises(ValueError, match="shared by sequences"):
        bm.owner(first[0])
    with pytest.raises(RuntimeError, match="not held by sequence 3"):
        bm.release(3, list(first))
    with pytest.raises(RuntimeError, match="not held by sequence 3"):
        bm.release(3, [second[1]])
    assert bm.owners(first[0]) == {1, 2} and bm.owner(second[1]) == 2


@pytest.mark.parametrize("bad", [[99], "twice"])
def test_a_release_that_raises_midway_releases_nothing(bad):
    bm = BlockManager(4, 2)
    table: list[int] = []
    bm.grow(1, table, 4)
    given = table + ([table[0]] if bad == "twice" else bad)
    with pytest.raises(RuntimeError, match="not held by sequence 1" if bad == [99] else "listed twice"):
        bm.release(1, given)
    assert given[:2] == table and bm.num_free == 2 and all(bm.owner(b) == 1 for b in table)
    bm.release(1, table)  # the table is still whole and releases normally
    assert table == [] and bm.num_free == 4


def test_an_admit_without_enough_free_blocks_takes_nothing():
    bm = BlockManager(3, 2, prefix_caching=True)
    first: list[int] = []
    bm.admit(1, first, [], 5)
    bm.register(first, [1, 2, 3, 4, 5], 5, None, [])
    bm.release(1, first)  # its two full blocks stay cached and evictable
    hits = bm.match([1, 2, 3, 4, 5, 6, 7, 8])
    assert len(hits) == 2 and bm.num_free == 3 and not bm.can_admit(hits, 8)
    table: list[int] = []
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.admit(2, table, hits, 8)
    assert table == [] and bm.num_free == 3 and all(not bm.owners(b) for b in hits)
    assert bm.match([1, 2, 3, 4, 5, 6, 7, 8]) == hits and bm.hit_rate == 0.0


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(12, 4)
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, int] = {}

    @rule(seq=st.integers(0, 5), extra=st.integers(1, 20))
    def grow(self, seq, extra):
        table = self.tables.setdefault(seq, [])
        want = self.tokens.get(seq, 0) + extra
        if self.bm.can_grow(table, want):
            self.bm.grow(seq, table, want)
            self.tokens[seq] = want
        else:
            free = self.bm.num_free
            with pytest.raises(RuntimeError):
                self.bm.grow(seq, table, want)
            assert self.bm.num_free == free

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def release(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tables)))
        self.bm.release(seq, self.tables[seq])
        self.tokens[seq] = 0

    @invariant()
    def blocks_partitioned(self):
        held = [b for t in self.tables.values() for b in t]
        assert len(held) == len(set(held)), "a block is shared"
        assert len(held) + self.bm.num_free == self.bm.num_blocks, "a block leaked"
        for seq, table in self.tables.items():
            assert all(self.bm.owner(b) == seq for b in table)
            assert len(table) == blocks_for(self.tokens.get(seq, 0), 4)


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
