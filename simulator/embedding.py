"""Deterministic embeddings for the simulated server, and the body OpenAI answers them in.

A text's vector comes from blake2b of the text: the same text gives the same vector in every
process, two texts almost surely different ones. As with OpenAI's `dimensions`, a shorter
vector is the longer one cut and normalised again. Values are float32, so the `float` and
`base64` encodings of one vector carry exactly the same numbers.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from typing import Any

from simulator import tokens
from simulator.job import MAX_DIMENSIONS, EmbeddingJob

_DIGEST_SIZE = 64
_BYTES_PER_VALUE = 2


def _raw_values(text: str) -> list[int]:
    """`MAX_DIMENSIONS` signed 16-bit values drawn from the text, in counter mode."""
    key = hashlib.blake2b(text.encode(), digest_size=32, person=b"gpuproxy-emb").digest()
    needed = MAX_DIMENSIONS * _BYTES_PER_VALUE
    stream = b"".join(
        hashlib.blake2b(block.to_bytes(8, "big"), digest_size=_DIGEST_SIZE, key=key).digest()
        for block in range(-(-needed // _DIGEST_SIZE))
    )
    return [value for (value,) in struct.iter_unpack(">h", stream[:needed])]


def vector(text: str, dimensions: int) -> list[float]:
    """The text's unit vector of `dimensions` float32 values."""
    raw = _raw_values(text)[:dimensions]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(value / norm for value in raw))
    return list(struct.unpack(f"<{dimensions}f", packed))


def _encoded(values: list[float], base64_encoded: bool) -> list[float] | str:
    if base64_encoded:
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


def prompt_tokens(job: EmbeddingJob) -> int:
    return sum(tokens.count_prompt_tokens(text) for text in job.texts)


def body(job: EmbeddingJob, model: str) -> dict[str, Any]:
    """The answer, as OpenAI's `POST /v1/embeddings` gives it."""
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": _encoded(vector(text, job.dimensions), job.base64),
        }
        for index, text in enumerate(job.texts)
    ]
    used = prompt_tokens(job)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }
