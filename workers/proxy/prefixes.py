"""Which machine has recently served which prompt prefixes: the index behind cache-aware routing.

An inference server keeps the attention state of prompts it has seen (its prefix or KV cache),
so a request whose prompt starts like an earlier one is cheaper on the machine that served
that one. The proxy cannot see those caches; it remembers instead what it sent where.

A prompt is cut into blocks of `BLOCK_CHARS` characters and each block is hashed together
with the hash before it (`hash(previous, block)`), so one hash stands for the whole prefix up
to the end of its block: two prompts share their leading hashes exactly as long as they share
their leading text. The hashes are blake2b (8 bytes, as an unsigned integer), the same in every
process and every replica, unlike Python's salted `hash()`.

`PrefixIndex` maps (block hash, machine) to the last time it was used, in a least-recently-used
order with a fixed bound: `max_entries` pairs, whatever the number of machines or prompts.
The default, 65,536, covers some four million characters of prompts (a million tokens or so)
and takes about 27 MB: some 400 bytes a pair with Python's object overheads. It is
approximate on purpose: a machine evicts from its own cache on its own schedule, and the index
only steers.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

BLOCK_CHARS = 64
MAX_PROMPT_BLOCKS = 512
"""Only the first 32,768 characters of a prompt are hashed: enough to tell conversations
apart, and it keeps the hashes of a `Routed` message under 5 KB in msgpack (10 KB in JSON)."""
DEFAULT_MAX_ENTRIES = 65_536
_SEED = bytes(8)
_PERSON = b"gpuproxy-prefix"


def prefix_blocks(
    prompt: str, *, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_PROMPT_BLOCKS
) -> list[int]:
    """The chained block hashes of a prompt's leading characters; a shorter last block counts
    too (a repeated prompt matches whole)."""
    hashes: list[int] = []
    previous = _SEED
    for start in range(0, min(len(prompt), block_chars * max_blocks), block_chars):
        block = prompt[start : start + block_chars].encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + block, digest_size=8, person=_PERSON).digest()
        hashes.append(int.from_bytes(previous, "big"))
    return hashes


class PrefixIndex:
    """Recently served prefix blocks per machine, bounded, least recently used evicted first."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("a prefix index needs room for at least one entry")
        self.max_entries = max_entries
        self._used: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._holders: dict[int, dict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._used)

    def insert(self, instance_id: str, blocks: Sequence[int], at_ms: int) -> None:
        """The machine was just sent a prompt made of these blocks.

        The blocks go in last to first, so a prompt's leading blocks are its most recently used
        and outlive its tail: an eviction shortens a cached prefix instead of cutting its head
        (the head is what every later match starts from)."""
        for block in reversed(blocks):
            key = (block, instance_id)
            self._used[key] = at_ms
            self._used.move_to_end(key)
            self._holders.setdefault(block, {})[instance_id] = None
        while len(self._used) > self.max_entries:
            (block, instance_id), _ = self._used.popitem(last=False)
            self._drop_holder(block, instance_id)

    def match(self, blocks: Sequence[int]) -> dict[str, int]:
        """For each machine holding the first block, how many leading blocks it holds in a row."""
        matched: dict[str, int] = {}
        still: set[str] | None = None
        for depth, block in enumerate(blocks, start=1):
            holders = self._holders.get(block)
            if not holders:
                break
            still = set(holders) if still is None else still.intersection(holders)
            if not still:
                break
            for instance_id in still:
                matched[instance_id] = depth
        return matched

    def forget(self, instance_id: str) -> None:
        """The machine is gone; its entries only take room."""
        gone = [key for key in self._used if key[1] == instance_id]
        for key in gone:
            del self._used[key]
            self._drop_holder(*key)

    def _drop_holder(self, block: int, instance_id: str) -> None:
        holders = self._holders.get(block)
        if holders is None:
            return
        holders.pop(instance_id, None)
        if not holders:
            del self._holders[block]
