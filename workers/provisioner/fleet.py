"""The configured providers, searched together.

A search asks every provider at once, each within its own time limit: one slow or failing
marketplace costs its own offers, reported by name, never the whole answer. Whatever the
providers filtered themselves, every filter is applied again here, so the answer is the same
whichever provider (or fake) answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping

import msgspec

from schemas import catalogue
from schemas.errors import FailedPrecondition, GpuproxyError, Unavailable
from schemas.gpus import GpuOffer, OfferQuery, ProviderName
from schemas.replies import OfferList
from workers.provisioner.providers.base import Provider

log = logging.getLogger("gpuproxy.provisioner")

DEFAULT_LIMIT = 100
OFFER_MEMORY_SECONDS = 60.0
"""How long a searched offer's facts serve a create that names it (price, GPU, location)."""
OFFER_MEMORY_SIZE = 20_000
"""The most offers remembered at once: a marketplace lists tens of thousands of asks, and a
long-running provisioner sees new ones all day; the oldest are forgotten first."""


def matches(offer: GpuOffer, query: OfferQuery) -> bool:
    if query.providers and offer.provider not in query.providers:
        return False
    if query.min_vram_gb and offer.vram_gb < query.min_vram_gb:
        return False
    if query.max_price_micros and offer.price_per_hour_micros > query.max_price_micros:
        return False
    if query.gpu_model and query.gpu_model.casefold() not in offer.gpu_model.casefold():
        return False
    if query.location and not offer.location.casefold().startswith(query.location.casefold()):
        return False
    if query.vendor and offer.vendor.casefold() != query.vendor.casefold():
        return False
    if query.tier and offer.tier.casefold() != query.tier.casefold():
        return False
    return not (query.min_gpus and offer.num_gpus < query.min_gpus)


def classified(offer: GpuOffer) -> GpuOffer:
    """The offer with vendor and tier from the catalogue when its provider left them out."""
    if offer.vendor and offer.tier:
        return offer
    found = catalogue.classify(offer.gpu_model)
    return msgspec.structs.replace(
        offer, vendor=offer.vendor or str(found.vendor), tier=offer.tier or str(found.tier)
    )


def by_price(offers: Iterable[GpuOffer]) -> list[GpuOffer]:
    return sorted(offers, key=lambda o: (o.price_per_hour_micros, o.provider, o.offer_id))


class Fleet:
    def __init__(
        self,
        providers: Mapping[ProviderName, Provider],
        *,
        search_seconds: float = 20.0,
        offer_memory_seconds: float = OFFER_MEMORY_SECONDS,
        offer_memory_size: int = OFFER_MEMORY_SIZE,
    ) -> None:
        self._providers = dict(providers)
        self._search_seconds = search_seconds
        self._memory_seconds = offer_memory_seconds
        self._memory_size = offer_memory_size
        self._seen: dict[tuple[ProviderName, str], tuple[float, GpuOffer]] = {}
        """Oldest first: an offer seen again moves to the end."""

    @property
    def names(self) -> list[ProviderName]:
        return list(self._providers)

    def providers(self) -> list[Provider]:
        return list(self._providers.values())

    def provider(self, name: ProviderName) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            raise FailedPrecondition(
                f"provider {name} is not configured in this deployment "
                f"(configured: {', '.join(self._providers) or 'none'})",
                field="provider",
            ) from None

    async def search(self, query: OfferQuery) -> OfferList:
        names = list(query.providers) or self.names
        for name in names:
            self.provider(name)  # an unconfigured provider named outright is an error
        answers = await asyncio.gather(*(self._search_one(name, query) for name in names))
        offers: list[GpuOffer] = []
        unavailable: dict[str, str] = {}
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, GpuproxyError):
                unavailable[str(name)] = answer.message
            else:
                offers.extend(answer)
        if not offers and unavailable and len(unavailable) == len(names):
            raise Unavailable(
                "no provider answered the search: "
                + "; ".join(f"{name}: {why}" for name, why in unavailable.items())
            )
        chosen = by_price(o for o in offers if matches(o, query))
        return OfferList(offers=chosen[: query.limit or DEFAULT_LIMIT], unavailable=unavailable)

    async def _search_one(
        self, name: ProviderName, query: OfferQuery
    ) -> list[GpuOffer] | GpuproxyError:
        provider = self._providers[name]
        try:
            async with asyncio.timeout(self._search_seconds):
                found = await provider.search(query)
        except TimeoutError:
            return Unavailable(f"did not answer within {self._search_seconds:g}s")
        except GpuproxyError as exc:
            return exc
        except Exception as exc:
            log.exception("searching %s failed (%s)", name, type(exc).__name__)
            return Unavailable(f"search failed ({type(exc).__name__})")
        offers = [classified(o) for o in found]
        self._remember(offers)
        return offers

    @property
    def remembered(self) -> int:
        """How many searched offers are remembered now."""
        return len(self._seen)

    def _remember(self, offers: Iterable[GpuOffer]) -> None:
        now = time.monotonic()
        for offer in offers:
            key = (offer.provider, offer.offer_id)
            self._seen.pop(key, None)
            self._seen[key] = (now, offer)
        self._forget(now)

    def _forget(self, now: float) -> None:
        """Drop offers past their memory, and the oldest beyond the size bound."""
        horizon = now - self._memory_seconds
        while self._seen:
            key, (seen_at, _) = next(iter(self._seen.items()))
            if seen_at >= horizon and len(self._seen) <= self._memory_size:
                return
            del self._seen[key]

    async def offer(self, name: ProviderName, offer_id: str) -> GpuOffer | None:
        """The offer as its provider lists it now (or listed it a moment ago)."""
        self.provider(name)  # an unconfigured provider is the caller's error, said so
        self._forget(time.monotonic())
        known = self._seen.get((name, offer_id))
        if known is not None:
            return known[1]
        answer = await self._search_one(name, OfferQuery(providers=(name,), limit=10_000))
        if isinstance(answer, GpuproxyError):
            raise answer
        for offer in answer:
            if offer.offer_id == offer_id:
                return offer
        return None

    async def close(self) -> None:
        for provider in self._providers.values():
            try:
                await provider.close()
            except Exception as exc:
                log.warning("closing provider %s failed (%s)", provider.name, type(exc).__name__)
