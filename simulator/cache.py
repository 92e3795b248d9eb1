"""The simulated server's KV cache: what makes a repeated prompt prefill faster.

Modelled on vLLM's automatic prefix caching. A prompt's tokens are cut into blocks of
`block_tokens`; only full blocks are cached, as in vLLM (a partial last block is always
computed). Block i's key hashes block i-1's key with block i's tokens, so a key names the
whole prefix up to its block and two prompts share cache exactly as far as they share a
prefix. The cache is an LRU of at most `capacity` keys; a prompt's cached part is its
longest run of leading blocks present. A router that sends a prompt where its prefix was
seen before wins time; one that scatters prompts loses it, which is what a cache-aware
routing test or benchmark needs to observe.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

_ROOT = b""
"""The parent key of a prompt's first block."""


def block_keys(prompt_tokens: list[str], block_tokens: int) -> list[bytes]:
    """The chained keys of the prompt's full blocks, first block first."""
    keys: list[bytes] = []
    parent = _ROOT
    for start in range(0, len(prompt_tokens) - block_tokens + 1, block_tokens):
        hasher = hashlib.blake2b(parent, digest_size=16, person=b"gpuproxy-kv")
        # Words hold no whitespace, so joining them with spaces is unambiguous.
        hasher.update(" ".join(prompt_tokens[start : start + block_tokens]).encode())
        parent = hasher.digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """An LRU of block keys; `capacity` 0 caches nothing."""

    def __init__(self, capacity: int, block_tokens: int) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        self.capacity = capacity
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def cached_tokens(self, prompt_tokens: list[str]) -> int:
        """How many of the prompt's leading tokens are cached now; changes nothing."""
        hits = 0
        for key in block_keys(prompt_tokens, self.block_tokens):
            if key not in self._blocks:
                break
            hits += 1
        return hits * self.block_tokens

    def store(self, prompt_tokens: list[str]) -> None:
        """Insert the prompt's blocks, or refresh them, as most recently used; the least
        recently used go beyond `capacity`."""
        if not self.capacity:
            return
        # Last block first, as vLLM frees them: a prompt's tail is evicted before its
        # prefix, the part other prompts are likeliest to share.
        for key in reversed(block_keys(prompt_tokens, self.block_tokens)):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
