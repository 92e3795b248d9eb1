"""The `sim` provider: the local marketplace of `simulator.market`, behind `Provider`.

Its machines are real local processes serving an OpenAI-compatible API, so everything above
the provider (reservations, readiness, proxying, failover, billing) runs for real on one
host. The marketplace works on files and processes, which block: every call runs in a
thread, off the event loop.

`LaunchSpec.env` steers a machine (latency, failures, slow or failed boots; the keys are
listed in `simulator.market`). The spec's image and ports are not used: every sim machine
runs the simulated server, on a free local port that its endpoint names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from schemas.errors import FailedPrecondition
from schemas.gpus import GpuOffer, LaunchSpec, OfferQuery, ProviderName
from simulator.market import CATALOGUE, MachineRecord, Market, Offer, OfferUnavailable
from workers.provisioner.providers.base import Machine, MachineStatus, Provider

DEFAULT_LIMIT = 100


class SimProvider(Provider):
    name = ProviderName.SIM

    def __init__(
        self,
        state_dir: Path,
        *,
        catalogue: Sequence[Offer] = CATALOGUE,
        owner_pid: int = 0,
    ) -> None:
        """`state_dir` is the marketplace, shared by every provisioner on this host;
        `owner_pid` is the process whose end stops every machine rented here (0: none)."""
        self.market = Market(state_dir, catalogue=catalogue, owner_pid=owner_pid)

    async def search(self, query: OfferQuery) -> list[GpuOffer]:
        available = await asyncio.to_thread(self.market.availability)
        offers = [_offer(offer, left) for offer, left in available]
        found = sorted(
            (offer for offer in offers if _matches(offer, query)),
            key=lambda offer: (offer.price_per_hour_micros, offer.offer_id),
        )
        return found[: query.limit or DEFAULT_LIMIT]

    async def create(self, offer_id: str, spec: LaunchSpec, *, label: str) -> str:
        try:
            record = await asyncio.to_thread(self.market.rent, offer_id, label=label, env=spec.env)
        except OfferUnavailable as exc:
            raise FailedPrecondition(f"sim: {exc}") from None
        return record.id

    async def get(self, provider_id: str) -> Machine | None:
        return await asyncio.to_thread(_machine_of_id, self.market, provider_id)

    async def list(self) -> list[Machine]:
        return await asyncio.to_thread(_all_machines, self.market)

    async def destroy(self, provider_id: str) -> None:
        await asyncio.to_thread(self.market.destroy, provider_id)


def _machine_of_id(market: Market, provider_id: str) -> Machine | None:
    record = market.machine(provider_id)
    return None if record is None else _machine(market, record)


def _all_machines(market: Market) -> list[Machine]:
    return [_machine(market, record) for record in market.machines()]


def _machine(market: Market, record: MachineRecord) -> Machine:
    if market.running(record):
        return Machine(
            provider_id=record.id,
            label=record.label,
            status=MachineStatus.RUNNING,
            endpoint=record.endpoint,
        )
    return Machine(
        provider_id=record.id,
        label=record.label,
        status=MachineStatus.EXITED,
        message=market.exit_note(record),
    )


def _offer(offer: Offer, left: int) -> GpuOffer:
    return GpuOffer(
        provider=ProviderName.SIM,
        offer_id=offer.offer_id,
        gpu_model=offer.gpu_model,
        num_gpus=offer.num_gpus,
        vram_gb=offer.vram_gb,
        price_per_hour_micros=offer.price_per_hour_micros,
        location=offer.location,
        available=left,
        metadata={"capacity": str(offer.capacity)},
    )


def _matches(offer: GpuOffer, query: OfferQuery) -> bool:
    """The query's filters that the marketplace knows; vendor and tier are the
    provisioner's to apply (it classifies GPU models)."""
    return (
        offer.vram_gb >= query.min_vram_gb
        and (not query.max_price_micros or offer.price_per_hour_micros <= query.max_price_micros)
        and query.gpu_model.lower() in offer.gpu_model.lower()
        and offer.location.lower().startswith(query.location.lower())
        and offer.num_gpus >= query.min_gpus
    )
