"""Shared rate limits on a real JetStream KV bucket: exact across limiter instances (as on
separate gateways), with leases that keep the bucket off the path of most requests."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.aio.client import Client

from bus.topology import declare_bucket
from gateway.auth.ratelimit import WINDOW_SECONDS, RateLimited, RateLimiter
from schemas import topology


@pytest.fixture
async def limiters(nc: Client) -> list[RateLimiter]:
    kv = await declare_bucket(nc.jetstream(), topology.rate_bucket())
    into = time.time() % WINDOW_SECONDS
    if into > WINDOW_SECONDS - 5:  # counts are per clock minute: stay inside one
        await asyncio.sleep(WINDOW_SECONDS - into + 0.1)
    return [RateLimiter(kv) for _ in range(3)]


async def admitted(limiter: RateLimiter, name: str, limit: int) -> bool:
    try:
        await limiter.take(name, limit, what="this test")
    except RateLimited:
        return False
    return True


async def test_a_limit_holds_exactly_across_limiters_taking_at_once(
    limiters: list[RateLimiter],
) -> None:
    results = await asyncio.gather(*(admitted(limiters[n % 3], "user.a", 50) for n in range(90)))
    assert results.count(True) == 50


async def test_a_large_limit_is_leased_in_chunks_and_still_exact(
    limiters: list[RateLimiter], nc: Client
) -> None:
    results = await asyncio.gather(
        *(admitted(limiters[n % 2], "user.b", 1000) for n in range(1100))
    )
    assert results.count(True) == 1000
    kv = await nc.jetstream().key_value(topology.RATE_BUCKET)
    keys = [k for k in await kv.keys() if k.startswith("user.b.")]
    entry = await kv.get(keys[0])
    assert entry.value == b"1000"
    assert (entry.revision or 0) < 150, "one bucket write per lease, not per request"


async def test_the_refusal_says_when_to_come_back(limiters: list[RateLimiter]) -> None:
    quota = await limiters[0].take("key.c", 1, what="this API key")
    assert (quota.limit, quota.remaining) == (1, 0)
    with pytest.raises(RateLimited) as raised:
        await limiters[1].take("key.c", 1, what="this API key")
    headers = raised.value.headers()
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["X-RateLimit-Limit"] == "1"
    assert "this API key allows 1 requests per minute" in raised.value.message


async def test_separate_credentials_count_separately(limiters: list[RateLimiter]) -> None:
    assert await admitted(limiters[0], "user.d", 1)
    assert await admitted(limiters[0], "user.e", 1)
    assert not await admitted(limiters[1], "user.d", 1)
