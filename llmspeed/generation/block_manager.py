"""Paged KV cache allocator: reference-counted blocks and an optional prefix cache (pure Python).

A sequence's KV cache lives in a list of block ids (its *block table*); token ``i`` of the
sequence sits in slot ``block_table[i // block_size] * block_size + i % block_size`` of the
cache tensors (:func:`slot`).

With ``prefix_caching=True`` (vLLM's automatic prefix caching), every *full* block whose keys and
values are computed is registered under a hash chain of its tokens: the key of block ``i`` is
``(key of block i - 1, tokens of block i, adapter)`` (the scheduler's ``adapter``: the sequence's LoRA adapter and
the model's weights when it was admitted), so two blocks share a key only when every
token before them is the same too. A new sequence whose leading full blocks are registered takes
them read-only (one more reference each) and computes only the rest. A block whose last reference
goes stays registered and *evictable*: it is handed out again, least recently used first, only
when no never-used block is left. New tokens are always written into a sequence's own blocks: a
shared block is full, and the block holding a prompt's last token is never taken from the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

BlockKey = tuple[Any, tuple[int, ...], Any]


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


def slot(block_table: Sequence[int], position: int, block_size: int) -> int:
    """The flat cache slot of token ``position`` of a sequence with ``block_table``."""
    return block_table[position // block_size] * block_size + position % block_size


def check_room(rows: Sequence[tuple[Sequence[int], int, int]], steps: int, block_size: int) -> None:
    """Raise ``ValueError`` unless each ``(block_table, position, token)`` row's table holds ``position + steps``
    tokens: what several decode steps back to back write (a row short of blocks would write another sequence's
    cache, or a scratch block)."""
    short = [i for i, (table, p, _) in enumerate(rows) if len(table) * block_size < p + steps]
    if short:
        table, p, _ = rows[short[0]]
        raise ValueError(f"rows {short}: each block table must hold position + steps tokens for steps={steps}; "
                         f"row {short[0]} is at position {p}, its {len(table)} blocks of {block_size} hold "
                         f"{len(table) * block_size}: grow them first")  # fmt: skip


class BlockManager:
    """Hands out KV-cache blocks; a block is free, evictable (cached, unused) or held by its owners.

    Args:
        num_blocks: Blocks in the cache (the KV budget in tokens is ``num_blocks * block_size``).
        block_size: Tokens per block.
        prefix_caching: Share computed full blocks between sequences with the same prefix.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1; got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # Pop from the end: low block ids first, so small runs touch little memory.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owners: dict[int, set[int]] = {}  # block id -> sequences holding it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self._key_of: dict[int, BlockKey] = {}  # registered block -> its key
        self._block_of: dict[BlockKey, int] = {}  # key -> registered block
        self.hit_tokens = 0  # prompt tokens found in the prefix cache
        self.query_tokens = 0  # prompt tokens looked up
        self.epoch = 0  # reset_prefix_cache's count: the scheduler keys the blocks of sequences it admits by it

    # --- counts ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now: never used, or cached and held by nobody."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or evictable)."""
        return len(self._key_of)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole cache can hold."""
        return self.num_blocks * self.block_size

    @property
    def hit_rate(self) -> float:
        """Share of the tokens looked up at admission served from the prefix cache: prompts, and a preempted request's
        prompt and output so far when it is admitted again (its blocks, freed, are often still cached)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def owners(self, block: int) -> frozenset[int]:
        """The sequences holding ``block`` (empty when it is free or evictable)."""
        return frozenset(self._owners.get(block, ()))

    def owner(self, block: int) -> int | None:
        """The one sequence holding ``block``, ``None`` when nobody does.

        Raises:
            ValueError: The block is shared by several sequences (use :meth:`owners`).
        """
        held = self._owners.get(block)
        if not held:
            return None
        if len(held) > 1:
            raise ValueError(f"block {block} is shared by sequences {sorted(held)}; use owners()")
        return next(iter(held))

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks a sequence holding ``block_table`` needs to store ``num_tokens`` tokens in total."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether free blocks can cover growing ``block_table`` to ``num_tokens`` tokens."""
        return self.blocks_needed(block_table, num_tokens) <= self.num_free

    # --- allocation -----------------------------------------------------------------------------
    def _take_free(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)  # least recently used cached block
        del self._block_of[self._key_of.pop(block)]
        return block

    def grow(self, seq_id: int, block_table: list[int], num_tokens: int) -> None:
        """Append blocks to ``block_table`` (in place) so it holds ``num_tokens`` tokens.

        Raises:
            RuntimeError: Not enough free blocks (check :meth:`can_grow` first); nothing is allocated.
        """
        need = self.blocks_needed(block_table, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free} free")
        for _ in range(need):
            block = self._take_free()
            self._owners[block] = {seq_id}
            block_table.append(block)

    def release(self, seq_id: int, block_table: list[int]) -> None:
        """Drop ``seq_id``'s hold on every block of ``block_table`` and empty the table.

        A block nobody holds any more becomes evictable when it is registered, else free.

        Raises:
            RuntimeError: A block of ``block_table`` is not held by ``seq_id``, or is listed twice; nothing is released.
        """
        seen: set[int] = set()
        for block in block_table:  # check them all first: a bad table changes nothing
            held = self._owners.get(block)
            if held is None or seq_id not in held:
                raise RuntimeError(f"block {block} is not held by sequence {seq_id}")
            if block in seen:
                raise RuntimeError(f"block {block} is listed twice in sequence {seq_id}'s block table {block_table}")
            seen.add(block)
        for block in block_table:
            held = self._owners[block]
            held.discard(seq_id)
            if not held:
                del self._owners[block]
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    # --- prefix cache ---------------------------------------------------------------------------
    def _keys(self, tokens: Sequence[int], num_blocks: int, adapter: Any, start: int = 0, prev: Any = None):
        bs = self.block_size
        for i in range(start, num_blocks):
            key = (prev, tuple(tokens[i * bs : (i + 1) * bs]), adapter)
            yield i, key
            prev = hash(key)

    def match(self, tokens: Sequence[int], adapter: Any = None) -> list[int]:
        """Registered blocks holding the longest cached prefix of ``tokens`` (at most all but the last token)."""
        if not self.prefix_caching:
            return []
        hits = []
        for _, key in self._keys(tokens, (len(tokens) - 1) // self.block_size, adapter):
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, hits: Sequence[int], num_tokens: int) -> bool:
        """Whether a new sequence taking ``hits`` can get blocks for ``num_tokens`` tokens."""
        fresh = blocks_for(num_tokens, self.block_size) - len(hits)
        reused_idle = sum(1 for b in hits if b in self._evictable)
        return fresh + reused_idle <= self.num_free

    def admit(self, seq_id: int, block_table: list[int], hits: Sequence[int], num_tokens: int) -> None:
        """Give an empty ``block_table`` the cached ``hits`` (shared) plus fresh blocks for ``num_tokens``.

        Raises:
            RuntimeError: The table is not empty, or not enough free blocks (check :meth:`can_admit` first); nothing
                is taken.
        """
        if block_table:
            raise RuntimeError(f"sequence {seq_id} already holds blocks {block_table}")
        if not self.can_admit(hits, num_tokens):  # before taking the hits: a failed admit holds nothing
            raise RuntimeError(f"out of KV blocks: {num_tokens} tokens with {len(hits)} cached blocks, "
                               f"{self.num_free} free")  # fmt: skip
        self.query_tokens += num_tokens
        self.hit_tokens += len(hits) * self.block_size
        for block in hits:
            self._evictable.pop(block, None)
            self._owners.setdefault(block, set()).add(seq_id)
            block_table.append(block)
        self.grow(seq_id, block_table, num_tokens)

    def register(self, block_table: Sequence[int], tokens: Sequence[int], num_computed: int,
                 adapter: Any, keys: list[int]) -> None:
        """Register the full computed blocks of a sequence that are not registered yet.

        ``keys`` is the sequence's own list of chain hashes (extended in place), so each block is hashed once.
        """
        if not self.prefix_caching:
            return
        full = num_computed // self.block_size
        if len(keys) >= full:
            return
        prev = keys[-1] if keys else None
        for i, key in self._keys(tokens, full, adapter, start=len(keys), prev=prev):
            keys.append(hash(key))
            block = block_table[i]
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached block (e.g. after the weights change); return how many.

        Blocks held by running sequences stay registered, but under the old :attr:`epoch`: sequences the
        scheduler admits from now on never match them.
        """
        self.epoch += 1
        n = len(self._evictable)
        for block in self._evictable:
            del self._block_of[self._key_of.pop(block)]
            self._free.append(block)
        self._evictable.clear()
        return n
