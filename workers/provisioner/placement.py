"""How a reservation picks offers for its instances.

- `cheapest`: the lowest hourly prices, an offer used as often as it has machines.
- `spread`: one machine per provider and location in turn, cheapest first within each, so a
  single host or region going down takes as few of the reservation's machines as it can.
- `performance`: the highest GPU tier, then the most GPU memory, then the lowest price.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from schemas.catalogue import Tier
from schemas.errors import InvalidArgument
from schemas.gpus import PLACEMENT_STRATEGIES, GpuOffer
from workers.provisioner.fleet import by_price

_TIER_RANK = {
    str(Tier.ENTERPRISE): 0,
    str(Tier.HIGH_END): 1,
    str(Tier.MID_RANGE): 2,
    str(Tier.BUDGET): 3,
}


def _cheapest(offers: Sequence[GpuOffer], count: int) -> list[GpuOffer]:
    picked: list[GpuOffer] = []
    for offer in by_price(offers):
        for _ in range(max(offer.available, 0)):
            if len(picked) == count:
                return picked
            picked.append(offer)
    return picked


def _spread(offers: Sequence[GpuOffer], count: int) -> list[GpuOffer]:
    groups: dict[tuple[str, str], list[GpuOffer]] = defaultdict(list)
    for offer in by_price(offers):
        groups[(offer.provider, offer.location)].extend([offer] * max(offer.available, 0))
    # Cheapest group first, then take one from each group in turn.
    queues = sorted(groups.values(), key=lambda g: g[0].price_per_hour_micros)
    picked: list[GpuOffer] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def _performance(offers: Sequence[GpuOffer], count: int) -> list[GpuOffer]:
    ranked = sorted(
        offers,
        key=lambda o: (
            _TIER_RANK.get(o.tier, len(_TIER_RANK)),
            -o.vram_gb * o.num_gpus,
            o.price_per_hour_micros,
            o.offer_id,
        ),
    )
    picked: list[GpuOffer] = []
    for offer in ranked:
        for _ in range(max(offer.available, 0)):
            if len(picked) == count:
                return picked
            picked.append(offer)
    return picked


STRATEGIES: dict[str, Callable[[Sequence[GpuOffer], int], list[GpuOffer]]] = {
    "cheapest": _cheapest,
    "spread": _spread,
    "performance": _performance,
}


assert tuple(STRATEGIES) == PLACEMENT_STRATEGIES


def check_strategy(name: str, *, field: str = "strategy") -> str:
    if name not in STRATEGIES:
        raise InvalidArgument(
            f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}", field=field
        )
    return name


def pick(offers: Sequence[GpuOffer], count: int, strategy: str) -> list[GpuOffer]:
    """Up to `count` offers (an offer repeated once per machine it adds), best first."""
    return STRATEGIES[check_strategy(strategy)](offers, count)
