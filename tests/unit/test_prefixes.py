"""The prefix index: chained block hashes of prompts and which machine served them lately."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.proxy.prefixes import BLOCK_CHARS, MAX_PROMPT_BLOCKS, PrefixIndex, prefix_blocks

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "You are a careful assistant. Answer briefly and cite your sources. " * 4


def test_a_prompt_is_cut_into_blocks_of_64_characters_with_a_shorter_last_one() -> None:
    assert len(prefix_blocks("")) == 0
    assert len(prefix_blocks("x" * BLOCK_CHARS)) == 1
    assert len(prefix_blocks("x" * (BLOCK_CHARS + 1))) == 2


def test_block_hashes_are_pinned_so_every_version_and_process_agrees() -> None:
    # Replicas of different builds share one index on the bus: the hash is part of the contract.
    assert prefix_blocks("a" * 64 + "b" * 10) == [11831760577771482695, 4539903205600471889]


def test_block_hashes_are_the_same_in_a_process_with_another_hash_seed() -> None:
    code = "from workers.proxy.prefixes import prefix_blocks; print(prefix_blocks('héllo ' * 40))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO_ROOT,
    )
    assert out.stdout.strip() == str(prefix_blocks("héllo " * 40))


def test_each_hash_stands_for_the_whole_prefix_not_only_its_block() -> None:
    block = "z" * BLOCK_CHARS
    first, second = prefix_blocks(block + block)
    assert first != second


def test_prompts_share_leading_hashes_exactly_as_long_as_they_share_leading_text() -> None:
    one = prefix_blocks(SYSTEM + "What is the capital of France? Please answer in one word.")
    two = prefix_blocks(SYSTEM + "How tall is Mont Blanc? Please answer in metres, roughly.")
    shared = len(SYSTEM) // BLOCK_CHARS
    assert one[:shared] == two[:shared]
    assert one[shared] != two[shared]


def test_only_the_first_blocks_of_a_huge_prompt_are_hashed() -> None:
    assert len(prefix_blocks("y" * BLOCK_CHARS * (MAX_PROMPT_BLOCKS + 10))) == MAX_PROMPT_BLOCKS


def test_a_match_counts_the_longest_leading_run_each_machine_holds() -> None:
    index = PrefixIndex()
    turn_one = prefix_blocks(SYSTEM + "Hello there, who are you?")
    turn_two = prefix_blocks(SYSTEM + "Hello there, who are you? I am fine, thanks. And you?")
    index.insert("i-a", turn_one, at_ms=1)
    index.insert("i-b", turn_two, at_ms=2)
    matched = index.match(turn_two)
    assert matched["i-b"] == len(turn_two)
    assert matched["i-a"] == len(SYSTEM) // BLOCK_CHARS
    assert matched["i-a"] < len(turn_one)


def test_a_machine_holding_later_blocks_without_the_first_matches_nothing() -> None:
    index = PrefixIndex()
    blocks = prefix_blocks("q" * BLOCK_CHARS * 4)
    index.insert("i-a", blocks[1:], at_ms=1)
    assert index.match(blocks) == {}


def test_a_prompt_nobody_served_matches_no_machine() -> None:
    index = PrefixIndex()
    index.insert("i-a", prefix_blocks(SYSTEM), at_ms=1)
    assert index.match(prefix_blocks("Something else entirely, nothing alike " * 3)) == {}


def test_the_index_never_holds_more_than_its_bound() -> None:
    index = PrefixIndex(max_entries=100)
    for n in range(50):
        index.insert(f"i-{n % 4}", prefix_blocks(f"prompt {n} " * 200), at_ms=n)
        assert len(index) <= 100
    assert len(index) == 100


def test_the_least_recently_used_prompt_is_evicted_first() -> None:
    index = PrefixIndex(max_entries=8)
    old, used, new = (prefix_blocks(c * BLOCK_CHARS * 3) for c in "abc")
    index.insert("i-a", old, at_ms=1)
    index.insert("i-b", used, at_ms=2)
    index.insert("i-b", used, at_ms=3)  # used again: now fresher than `old`
    index.insert("i-c", new, at_ms=4)  # 9 entries for 8 places
    assert index.match(old) == {"i-a": 2}
    assert index.match(used) == {"i-b": 3}
    assert index.match(new) == {"i-c": 3}


def test_an_eviction_shortens_a_cached_prefix_instead_of_cutting_its_head() -> None:
    index = PrefixIndex(max_entries=6)
    long = prefix_blocks("L" * BLOCK_CHARS * 5)
    index.insert("i-a", long, at_ms=1)
    index.insert("i-b", prefix_blocks("S" * BLOCK_CHARS * 3), at_ms=2)
    assert index.match(long) == {"i-a": 3}


def test_the_same_prefix_on_two_machines_is_two_entries() -> None:
    index = PrefixIndex()
    blocks = prefix_blocks(SYSTEM)
    index.insert("i-a", blocks, at_ms=1)
    index.insert("i-b", blocks, at_ms=2)
    assert len(index) == 2 * len(blocks)
    assert index.match(blocks) == {"i-a": len(blocks), "i-b": len(blocks)}


def test_a_forgotten_machine_leaves_the_index() -> None:
    index = PrefixIndex()
    blocks = prefix_blocks(SYSTEM)
    index.insert("i-a", blocks, at_ms=1)
    index.insert("i-b", blocks, at_ms=2)
    index.forget("i-a")
    assert index.match(blocks) == {"i-b": len(blocks)}
    assert len(index) == len(blocks)


def test_an_index_without_room_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        PrefixIndex(max_entries=0)
