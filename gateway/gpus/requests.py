"""What a client asks of GPUs, checked field by field and turned into bus values.

Both front doors parse through here, so a filter means the same on gRPC and HTTP and a bad
value gets the same message naming the same field. Prices arrive as decimal text (HTTP),
doubles (gRPC, compatibility) or integer micros; they become integer micros here and are
never computed with as floats. A price here is a filter's bound, not an amount charged or
paid: a maximum with more than six decimals is rounded down to a micro-unit (a client that
computes `0.1 * 3` sends 0.30000000000000004), never refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from decimal import ROUND_FLOOR, Decimal, InvalidOperation

import msgspec

from schemas.commands import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_READY_SECONDS,
    MAX_BATCH_COUNT,
    MAX_LEASE_SECONDS,
    MAX_READY_SECONDS,
    MAX_RESERVE_COUNT,
    MIN_LEASE_SECONDS,
)
from schemas.errors import InvalidArgument
from schemas.gpus import (
    ALL_PROVIDERS,
    PLACEMENT_STRATEGIES,
    PROVIDER_ALIASES,
    LaunchSpec,
    OfferQuery,
    ProviderName,
)

MICROS = Decimal(1_000_000)
ONE_MICRO = Decimal("0.000001")
MAX_PRICE_MICROS = 1_000_000 * 1_000_000
"""A million units an hour: anything above is a typo, not a filter."""
MAX_VRAM_GB = 100_000
MAX_ENV = 64
MAX_PORTS = 16

_ID = re.compile(r"[A-Za-z0-9_.:@=-]{1,128}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")


def provider(value: str, *, field: str = "provider") -> ProviderName:
    found = PROVIDER_ALIASES.get(value.strip().lower())
    if found is None:
        known = ", ".join(ProviderName)
        raise InvalidArgument(f"unknown provider {value!r}; one of {known}", field=field)
    return found


def providers(value: str, *, field: str = "provider") -> tuple[ProviderName, ...]:
    """Empty or "all": every configured provider; else one, or several separated by commas."""
    if value.strip().lower() in ALL_PROVIDERS:
        return ()
    return tuple(dict.fromkeys(provider(part, field=field) for part in value.split(",")))


def max_price_micros(value: str | float | int | Decimal, *, field: str) -> int:
    """A maximum price in units (decimal text or a number) as integer micro-units, rounded
    down: an offer at the rounded bound is within what the caller asked for.

    A double goes through its shortest text (`str`, as `repr`), so 0.3 is 0.3 and not the
    binary 0.29999999999999998889... that `Decimal(0.3)` would round down to 0.299999.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument("must be a finite number", field=field)
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidArgument("must be a decimal number, e.g. 1.25", field=field) from None
    if not amount.is_finite():
        raise InvalidArgument("must be a finite number", field=field)
    if amount < 0:
        raise InvalidArgument("must not be negative", field=field)
    if amount > MAX_PRICE_MICROS / MICROS:
        raise InvalidArgument(f"must be at most {MAX_PRICE_MICROS} micros", field=field)
    micros = int(amount.quantize(ONE_MICRO, rounding=ROUND_FLOOR) * MICROS)
    if micros == 0 and amount > 0:
        # 0 means "no maximum": a bound below one micro must not silently lift the filter.
        raise InvalidArgument("must be 0 (no maximum) or at least 0.000001", field=field)
    return micros


def checked_micros(value: int, *, field: str) -> int:
    if value < 0:
        raise InvalidArgument("must not be negative", field=field)
    if value > MAX_PRICE_MICROS:
        raise InvalidArgument(f"must be at most {MAX_PRICE_MICROS} micros", field=field)
    return value


def vram_gb(value: float | int | str, *, field: str = "min_vram") -> int:
    try:
        number = float(value)
    except ValueError:
        raise InvalidArgument("must be a number of GB", field=field) from None
    if not math.isfinite(number) or number < 0:
        raise InvalidArgument("must be a number of GB, not negative", field=field)
    if number > MAX_VRAM_GB:
        raise InvalidArgument(f"must be at most {MAX_VRAM_GB} GB", field=field)
    # A GPU with 23.5 GB does not satisfy "at least 23.5": round the floor up.
    return math.ceil(number)


def short_text(value: str, *, field: str, most: int = 64) -> str:
    value = value.strip()
    if len(value) > most:
        raise InvalidArgument(f"must be at most {most} characters", field=field)
    return value


def query(
    *,
    provider_text: str = "",
    min_vram: float | int | str = 0,
    max_price_micros: int = 0,
    gpu_model: str = "",
    location: str = "",
    vendor: str = "",
    tier: str = "",
    prefix: str = "",
) -> OfferQuery:
    return OfferQuery(
        providers=providers(provider_text, field=f"{prefix}provider"),
        min_vram_gb=vram_gb(min_vram, field=f"{prefix}min_vram"),
        max_price_micros=checked_micros(max_price_micros, field=f"{prefix}max_price"),
        gpu_model=short_text(gpu_model, field=f"{prefix}gpu_model"),
        location=short_text(location, field=f"{prefix}location"),
        vendor=short_text(vendor, field=f"{prefix}vendor").lower(),
        tier=short_text(tier, field=f"{prefix}tier").lower(),
    )


def spec(
    *,
    image: str = "",
    env: Mapping[str, str] | None = None,
    ports: Iterable[int] = (),
    disk_gb: int = 0,
    prefix: str = "",
) -> LaunchSpec:
    image = image.strip()
    if image and not _IMAGE.fullmatch(image):
        raise InvalidArgument(
            "must be a container image reference, e.g. vllm/vllm-openai:latest",
            field=f"{prefix}image",
        )
    env = dict(env or {})
    if len(env) > MAX_ENV:
        raise InvalidArgument(f"at most {MAX_ENV} variables", field=f"{prefix}env")
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise InvalidArgument(
                f"{name[:40]!r} is not a variable name (letters, digits, _)", field=f"{prefix}env"
            )
        if len(value) > 4096:
            raise InvalidArgument(f"{name} is longer than 4096 characters", field=f"{prefix}env")
    port_list = list(ports)
    if len(port_list) > MAX_PORTS:
        raise InvalidArgument(f"at most {MAX_PORTS} ports", field=f"{prefix}ports")
    for port in port_list:
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"{port} is not a port (1-65535)", field=f"{prefix}ports")
    if len(set(port_list)) != len(port_list):
        raise InvalidArgument("a port is listed twice", field=f"{prefix}ports")
    if not 0 <= disk_gb <= 100_000:
        raise InvalidArgument("must be between 0 and 100000", field=f"{prefix}disk_gb")
    return LaunchSpec(image=image, env=env, ports=tuple(port_list), disk_gb=disk_gb)


def identifier(value: str, *, field: str) -> str:
    if not _ID.fullmatch(value):
        raise InvalidArgument("must be 1 to 128 letters, digits or . _ : @ = -", field=field)
    return value


def count(value: int, *, field: str = "count") -> int:
    if not 1 <= value <= MAX_RESERVE_COUNT:
        raise InvalidArgument(f"must be between 1 and {MAX_RESERVE_COUNT}", field=field)
    return value


def batch_count(value: int, *, field: str) -> int:
    if not 0 <= value <= MAX_BATCH_COUNT:
        raise InvalidArgument(f"must be between 0 and {MAX_BATCH_COUNT}", field=field)
    return value


def batch_counts(
    counts: Mapping[str, int], *, vastai: int = 0, ionet: int = 0
) -> dict[ProviderName, int]:
    """Instances per provider: `counts` by name, plus the original API's two fields."""
    found: dict[ProviderName, int] = {}
    for name, value in counts.items():
        found[provider(name, field="counts")] = batch_count(value, field=f"counts.{name}")
    if vastai:
        found[ProviderName.VASTAI] = batch_count(vastai, field="vastai_count")
    if ionet:
        found[ProviderName.IONET] = batch_count(ionet, field="ionet_count")
    if not any(found.values()):
        raise InvalidArgument("ask for at least one instance", field="counts")
    if sum(found.values()) > MAX_BATCH_COUNT:
        raise InvalidArgument(f"at most {MAX_BATCH_COUNT} instances in one batch", field="counts")
    return found


def lease_seconds(value: int | None, *, field: str = "lease_seconds") -> int:
    if value is None or value == 0:
        return DEFAULT_LEASE_SECONDS
    if not MIN_LEASE_SECONDS <= value <= MAX_LEASE_SECONDS:
        raise InvalidArgument(
            f"must be between {MIN_LEASE_SECONDS} and {MAX_LEASE_SECONDS} seconds", field=field
        )
    return value


def ready_seconds(value: int | None, *, field: str = "ready_timeout_seconds") -> int:
    if value is None or value == 0:
        return DEFAULT_READY_SECONDS
    if not 1 <= value <= MAX_READY_SECONDS:
        raise InvalidArgument(f"must be between 1 and {MAX_READY_SECONDS} seconds", field=field)
    return value


def strategy(value: str, *, field: str = "strategy") -> str:
    value = value.strip().lower()
    if value and value not in PLACEMENT_STRATEGIES:
        raise InvalidArgument(
            f"unknown strategy; one of {', '.join(PLACEMENT_STRATEGIES)}", field=field
        )
    return value


class FilterBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Offer filters as an HTTP body carries them."""

    provider: str = ""
    min_vram: float = 0
    max_price: str | float | None = None
    max_price_micros: int = 0
    gpu_model: str = ""
    location: str = ""
    vendor: str = ""
    tier: str = ""

    def checked(self, prefix: str) -> OfferQuery:
        price = self.max_price_micros
        if self.max_price is not None:
            price = max_price_micros(self.max_price, field=f"{prefix}max_price")
        return query(
            provider_text=self.provider,
            min_vram=self.min_vram,
            max_price_micros=price,
            gpu_model=self.gpu_model,
            location=self.location,
            vendor=self.vendor,
            tier=self.tier,
            prefix=prefix,
        )
