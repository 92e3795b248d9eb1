"""What the simulated server has seen: its own window (`GET /sim/stats`), not OpenAI's.

Tests and benchmarks read it to see what reached a machine: how many requests, how many are
running, how many ended because their client went away (a proxy that cancels upstream work
when its caller leaves shows here), and how much of the prompts the KV cache held.
"""

from __future__ import annotations

import enum
import time
from typing import Any


class Outcome(enum.Enum):
    COMPLETED = "completed"
    """The whole answer was produced and handed to the connection."""
    DISCONNECTED = "disconnected"
    """The client went away before the answer ended."""
    FAILED = "failed"
    """Refused, a bad request, or ended on purpose by a fail mode."""


class Stats:
    """Counters over every inference request (chat, completions, responses, embeddings)."""

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.completed = 0
        self.disconnected = 0
        self.last_disconnect_at: float | None = None
        self.cached_tokens = 0
        self.prompt_tokens = 0

    def arrive(self) -> Visit:
        self.requests += 1
        self.in_flight += 1
        return Visit(self)

    def prefilled(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "completed": self.completed,
            "disconnected": self.disconnected,
            "last_disconnect_at": self.last_disconnect_at,
            "cached_tokens": self.cached_tokens,
            "prompt_tokens": self.prompt_tokens,
        }


class Visit:
    """One request's stay: ends once, with its outcome; later ends change nothing."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self.outcome: Outcome | None = None

    def end(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        stats = self._stats
        stats.in_flight -= 1
        if outcome is Outcome.COMPLETED:
            stats.completed += 1
        elif outcome is Outcome.DISCONNECTED:
            stats.disconnected += 1
            stats.last_disconnect_at = time.time()
