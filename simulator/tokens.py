"""Deterministic answers for the simulated inference servers.

The same model, prompt, seed and `max_tokens` give the same tokens in every process and on
every run, so a test or a benchmark can predict an answer, and a retried request on another
machine produces what the first would have. Tokens are plain English words drawn from a fixed
vocabulary by blake2b in counter mode: no global random state, nothing to configure.
"""

from __future__ import annotations

import hashlib

# A paragraph reads better than two hundred quoted words.
VOCABULARY: tuple[str, ...] = tuple(
    """
    the a an and or but if then when while because so although after before since until
    river mountain valley forest ocean desert island meadow garden harbor city village
    bridge tower road path street market station library museum school kitchen window door
    table chair lamp book letter paper pencil story song poem picture map clock mirror key
    morning evening night winter summer autumn spring weather rain snow wind cloud sun moon
    star light shadow color sound voice silence music rhythm dance game puzzle question answer
    idea reason memory dream plan journey friend teacher doctor farmer sailor painter writer
    builder traveler neighbor child family people animal bird horse dog cat fish tree flower
    stone water fire earth metal glass wood bread apple orange coffee tea honey salt
    quick slow quiet loud bright dark warm cold gentle strong simple careful curious happy
    calm busy early late small large long short old new young ancient modern distant
    near open hidden golden silver green blue red white heavy bold soft sharp clear
    walks runs builds finds carries opens closes reads writes sings paints watches listens
    remembers follows gathers shares explains discovers crosses climbs rests waits returns
    grows turns holds brings keeps makes takes gives shows tells asks learns
    slowly quickly softly often always never sometimes together again almost nearly
    here there above below across along around between through toward within without
    """.split()  # noqa: SIM905
)
"""About two hundred words: enough variety that two different answers rarely look alike."""

NATURAL_LENGTH = (32, 512)
"""An answer ends by itself ("stop") after this many tokens, at most; below `max_tokens`
it is cut ("length"). A small `max_tokens` (the default 16) therefore always gives exactly
`max_tokens` tokens, which keeps usage predictable for tests and benchmarks."""

_WORDS_PER_BLOCK = 32
"""One 64-byte blake2b digest gives 32 two-byte indices into the vocabulary."""


def _key(model: str, prompt: str, seed: int | None) -> bytes:
    hasher = hashlib.blake2b(digest_size=32, person=b"gpuproxy-sim")
    for part in (model, prompt, "" if seed is None else str(seed)):
        encoded = part.encode()
        # Length-prefixed, so ("ab", "c") and ("a", "bc") hash differently.
        hasher.update(len(encoded).to_bytes(8, "big"))
        hasher.update(encoded)
    return hasher.digest()


def _block(key: bytes, index: int) -> bytes:
    return hashlib.blake2b(index.to_bytes(8, "big"), digest_size=64, key=key).digest()


def natural_length(model: str, prompt: str, seed: int | None = None) -> int:
    """How many tokens the answer has when `max_tokens` does not cut it."""
    low, high = NATURAL_LENGTH
    draw = int.from_bytes(_key(model, prompt, seed)[:4], "big")
    return low + draw % (high - low + 1)


def generate(
    model: str, prompt: str, max_tokens: int, seed: int | None = None, *, ignore_eos: bool = False
) -> list[str]:
    """The answer's tokens, at most `max_tokens`; joined they give its text.

    Every token but the first carries its leading space, as real tokenizers' pieces do, so a
    streaming client that concatenates deltas gets the same text as a non-streaming one.
    """
    count = max_tokens if ignore_eos else min(max_tokens, natural_length(model, prompt, seed))
    key = _key(model, prompt, seed)
    words: list[str] = []
    block_index = 0
    while len(words) < count:
        digest = _block(key, block_index)
        block_index += 1
        for offset in range(0, len(digest), 2):
            if len(words) == count:
                break
            pick = int.from_bytes(digest[offset : offset + 2], "big") % len(VOCABULARY)
            words.append(VOCABULARY[pick])
    return [word if i == 0 else f" {word}" for i, word in enumerate(words)]


def split_prompt(prompt: str) -> list[str]:
    """A prompt's tokens: its whitespace-separated words (what the KV-cache model cuts into
    blocks)."""
    return prompt.split()


def count_prompt_tokens(prompt: str) -> int:
    """A prompt's size in tokens: its whitespace-separated words, at least one (a real
    tokenizer always adds some)."""
    return max(1, len(split_prompt(prompt)))
