"""Fixtures of the end-to-end tests: one running system per test, and an HTTP client to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.e2e.system import System, running_system


@pytest.fixture
async def system(nats_url: str, migrated_database: str) -> AsyncIterator[System]:
    async with running_system(nats_url, migrated_database) as running:
        yield running


@pytest.fixture
async def http(system: System) -> AsyncIterator[httpx.AsyncClient]:
    # Generous: a reservation waits for its sim machines to boot on a busy machine.
    async with httpx.AsyncClient(base_url=system.http_base, timeout=60) as client:
        yield client
