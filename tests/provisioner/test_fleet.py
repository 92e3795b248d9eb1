"""The fleet's memory of searched offers is bounded in time and in size."""

from __future__ import annotations

import asyncio
from pathlib import Path

from schemas.gpus import OfferQuery, ProviderName
from simulator.market import CATALOGUE
from workers.provisioner.fleet import Fleet
from workers.provisioner.providers.sim import SimProvider


async def test_the_fleet_remembers_no_more_offers_than_its_bound(tmp_path: Path) -> None:
    fleet = Fleet({ProviderName.SIM: SimProvider(tmp_path / "sim")}, offer_memory_size=3)
    found = await fleet.search(OfferQuery())
    assert len(found.offers) == len(CATALOGUE) > 3
    assert fleet.remembered == 3
    # The most recently seen are kept: a create naming one is served from memory.
    newest = found.offers[-1]
    assert await fleet.offer(ProviderName.SIM, newest.offer_id) == newest


async def test_the_fleet_forgets_offers_it_has_not_seen_lately(tmp_path: Path) -> None:
    fleet = Fleet({ProviderName.SIM: SimProvider(tmp_path / "sim")}, offer_memory_seconds=0.2)
    first = await fleet.search(OfferQuery(gpu_model="H100"))
    assert fleet.remembered == len(first.offers) == 2
    await asyncio.sleep(0.3)
    second = await fleet.search(OfferQuery(gpu_model="RTX 4090"))
    assert fleet.remembered == len(second.offers) == 2
