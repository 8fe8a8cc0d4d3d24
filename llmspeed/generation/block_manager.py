"""Paged KV cache allocator: fixed-size blocks handed out from a free list (pure Python).

A sequence's KV cache lives in a list of block ids (its *block table*); token ``i`` of the
sequence sits in slot ``block_table[i // block_size] * block_size + i % block_size`` of the
cache tensors. Blocks are returned to the free list when the sequence ends, is aborted or is
preempted, so a finished request never holds memory.
"""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Hands out KV-cache blocks; every block is either free or owned by exactly one sequence.

    Args:
        num_blocks: Blocks in the cache (the KV budget in tokens is ``num_blocks * block_size``).
        block_size: Tokens per block.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1; got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Pop from the end: low block ids first, so small runs touch little memory.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owner: dict[int, int] = {}  # block id -> owning sequence id

    @property
    def num_free(self) -> int:
        """Blocks not owned by any sequence."""
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole cache can hold."""
        return self.num_blocks * self.block_size

    def owner(self, block: int) -> int | None:
        """The sequence that owns ``block``, or ``None`` when it is free."""
        return self._owner.get(block)

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks a sequence holding ``block_table`` needs to store ``num_tokens`` tokens in total."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether the free list can cover growing ``block_table`` to ``num_tokens`` tokens."""
        return self.blocks_needed(block_table, num_tokens) <= len(self._free)

    def grow(self, seq_id: int, block_table: list[int], num_tokens: int) -> None:
        """Append blocks to ``block_table`` (in place) so it holds ``num_tokens`` tokens.

        Raises:
            RuntimeError: Not enough free blocks (check :meth:`can_grow` first); nothing is allocated.
        """
        need = self.blocks_needed(block_table, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self._free)} free")
        for _ in range(need):
            block = self._free.pop()
            self._owner[block] = seq_id
            block_table.append(block)

    def release(self, seq_id: int, block_table: list[int]) -> None:
        """Return every block of ``block_table`` to the free list and empty the table."""
        for block in block_table:
            if self._owner.get(block) != seq_id:
                raise RuntimeError(f"block {block} is not owned by sequence {seq_id}")
            del self._owner[block]
            self._free.append(block)
        block_table.clear()
