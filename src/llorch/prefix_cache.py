"""A prefix cache: the keys and values of prompts already run, reused by prompts that start the same way.

The rows are kept in blocks of BLOCK_TOKENS positions, each keyed by the whole token prefix up to its end (a
block's rows depend on every token before them), and evicted least recently used first within a byte
budget. A new sequence gets the rows of the longest cached prefix of its prompt copied into its own KVCache
-- a copy per layer, far cheaper than recomputing them -- so a cache stays a plain array whose only state is
its length, and the rows are bitwise those a cold prompt computes (a row depends only on the tokens up to it).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from .model import KVCache

BLOCK_TOKENS = 32


class PrefixCache:
    """Blocks of cached rows within capacity_bytes (0: nothing is cached). `hit_tokens` counts the positions
    copied instead of computed."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self.hit_tokens = 0
        self._blocks: OrderedDict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def extend(self, prompt_ids: Sequence[int], cache: KVCache, upto: int) -> int:
        """Continue cache (holding the rows of prompt_ids[:cache.length]) with the cached rows that follow,
        up to position `upto` at most; returns how many positions were copied."""
        start, end = cache.length, cache.length
        used = []
        while end < upto:
            block = end // BLOCK_TOKENS
            rows = self._blocks.get(tuple(prompt_ids[:(block + 1) * BLOCK_TOKENS]))
            if rows is None:
                break
            first, stop = block * BLOCK_TOKENS, min((block + 1) * BLOCK_TOKENS, upto)
            cache.k[:, :, end:stop] = rows[0][:, :, end - first:stop - first]
            cache.v[:, :, end:stop] = rows[1][:, :, end - first:stop - first]
            used.append((block + 1) * BLOCK_TOKENS)
            end = stop
        # deepest first, so a prefix is always more recent than its extensions and outlives them
        for block_end in reversed(used):
            self._blocks.move_to_end(tuple(prompt_ids[:block_end]))
        cache.length = end
        self.hit_tokens += end - start
        return end - start

    def store(self, prompt_ids: Sequence[int], cache: KVCache, from_block: int) -> int:
        """Keep the blocks from_block.. of prompt_ids that cache has computed in full; returns the number of
        the first block not stored yet (the next call's from_block)."""
        if not self.capacity_bytes:
            return from_block
        full = min(cache.length, len(prompt_ids)) // BLOCK_TOKENS
        for block in range(from_block, full):
            key = tuple(prompt_ids[:(block + 1) * BLOCK_TOKENS])
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            positions = slice(block * BLOCK_TOKENS, (block + 1) * BLOCK_TOKENS)
            rows = (cache.k[:, :, positions].copy(), cache.v[:, :, positions].copy())
            self._blocks[key] = rows
            self.nbytes += rows[0].nbytes + rows[1].nbytes
        while self.nbytes > self.capacity_bytes:
            _, (k, v) = self._blocks.popitem(last=False)
            self.nbytes -= k.nbytes + v.nbytes
        return max(from_block, full)
