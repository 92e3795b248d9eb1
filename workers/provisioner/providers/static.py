"""Bring-your-own endpoints: OpenAI-compatible servers someone already runs, rented as offers.

Each endpoint in the configuration (a vLLM, TGI, Ollama or llama.cpp server with its GPU facts
and price) is an offer with capacity one. Renting it is claiming it in the
`gpuproxy-static-claims` KV bucket with an atomic create, so any number of provisioner
replicas agree on who holds it; destroying it is dropping the claim. The machine is the
endpoint itself: it always runs, and the launch spec is not used.

`GPUPROXY_STATIC_ENDPOINTS` holds the configuration: a value starting with `[` is an inline
JSON array of endpoints, anything else is the path of a TOML file with `[[endpoints]]` tables.
An upstream API key never appears in the configuration: `api_key_env` names the environment
variable that holds it, and the key is kept out of every repr, log line and error.
"""

from __future__ import annotations

import builtins
import contextlib
import hmac
import json
import re
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from schemas.catalogue import classify
from schemas.errors import ConfigError, FailedPrecondition, Unavailable
from schemas.gpus import GpuOffer, LaunchSpec, OfferQuery, ProviderName

from .base import Machine, MachineStatus, Provider

ENV_VAR = "GPUPROXY_STATIC_ENDPOINTS"
MICROS_PER_UNIT = 1_000_000

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYS = frozenset(
    ("name", "url", "gpu_model", "num_gpus", "vram_gb", "price_per_hour", "location", "api_key_env")
)
_MAX_GPUS = 1024
_MAX_VRAM_GB = 4096
_MAX_PRICE = Decimal(1_000_000)
"""Units per hour; anything above is a typo (or micros written as units)."""


class UpstreamKey:
    """An upstream API key: shown as `<upstream key>` wherever it is printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<upstream key>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UpstreamKey):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(UpstreamKey)


class StaticEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One configured endpoint."""

    name: str
    """Unique; the offer id and the provider id of the machine it becomes."""
    url: str
    """Base URL of the OpenAI-compatible API, without a trailing `/` and without `/v1`."""
    gpu_model: str
    """As written in the configuration; offers show the catalogue's canonical model."""
    vram_gb: int
    price_per_hour_micros: int
    """The whole endpoint (every GPU of it) per hour."""
    num_gpus: int = 1
    location: str = ""
    api_key_env: str = ""
    """The name of the variable the key was read from, never the key."""
    api_key: UpstreamKey | None = None


class StaticClaim(msgspec.Struct, frozen=True, kw_only=True):
    """What the claims bucket holds under an endpoint's name while it is rented."""

    label: str
    endpoint: str
    claimed_at_ms: int


# --- configuration ---------------------------------------------------------------------------


def _fault(message: str) -> ConfigError:
    return ConfigError(message, field=ENV_VAR)


def load_endpoints(env: Mapping[str, str]) -> list[StaticEndpoint]:
    """The endpoints `GPUPROXY_STATIC_ENDPOINTS` declares; none when it is unset or blank."""
    raw = env.get(ENV_VAR, "").strip()
    if not raw:
        return []
    entries = _json_entries(raw) if raw.startswith("[") else _toml_entries(Path(raw))
    endpoints: list[StaticEndpoint] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        endpoint = _endpoint(f"endpoints[{index}]", entry, env)
        if endpoint.name in seen:
            raise _fault(
                f"endpoints[{index}].name {endpoint.name!r} is already used by "
                f"endpoints[{seen[endpoint.name]}]"
            )
        seen[endpoint.name] = index
        endpoints.append(endpoint)
    return endpoints


def _json_entries(raw: str) -> list[Any]:
    try:
        entries = json.loads(raw, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        # The error's own text names a position only, never the content.
        raise _fault(f"is not a valid JSON array of endpoints: {exc.msg} at {exc.pos}") from None
    if not isinstance(entries, list):
        raise _fault("is not a valid JSON array of endpoints")
    return entries


def _toml_entries(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fault(f"names {path}, which cannot be read ({type(exc).__name__})") from None
    try:
        document = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise _fault(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"endpoints"})
    if unknown:
        raise _fault(f"{path} has unknown top-level key {unknown[0]!r}; expected [[endpoints]]")
    entries = document.get("endpoints", [])
    if not isinstance(entries, list):
        raise _fault(f"{path}: endpoints must be an array of tables ([[endpoints]])")
    return entries


def _endpoint(where: str, entry: object, env: Mapping[str, str]) -> StaticEndpoint:
    if not isinstance(entry, dict):
        raise _fault(f"{where} must be a table of settings")
    for key in entry:
        if key == "api_key":
            raise _fault(
                f"{where}.api_key: the key itself does not belong in the configuration; "
                "set api_key_env to the name of the environment variable that holds it"
            )
        if key not in _KEYS:
            raise _fault(f"{where} has unknown key {key!r}; known: {', '.join(sorted(_KEYS))}")
    name = _text(where, entry, "name", required=True)
    if not _NAME.fullmatch(name):
        raise _fault(f"{where}.name must be 1-64 letters, digits, '_' or '-'")
    gpu_model = _text(where, entry, "gpu_model", required=True)
    typical = classify(gpu_model).vram_gb
    if "vram_gb" not in entry and not typical:
        raise _fault(f"{where}.vram_gb is required: the GPU catalogue does not know {gpu_model!r}")
    vram_gb = _whole(where, entry, "vram_gb", default=typical, most=_MAX_VRAM_GB)
    key_env = _text(where, entry, "api_key_env")
    return StaticEndpoint(
        name=name,
        url=_url(where, entry),
        gpu_model=gpu_model,
        vram_gb=vram_gb,
        price_per_hour_micros=_micros(where, entry),
        num_gpus=_whole(where, entry, "num_gpus", default=1, most=_MAX_GPUS),
        location=_text(where, entry, "location"),
        api_key_env=key_env,
        api_key=_key(where, key_env, env) if key_env else None,
    )


def _text(where: str, entry: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise _fault(f"{where}.{key} must be a string")
    value = value.strip()
    if required and not value:
        raise _fault(f"{where}.{key} is required")
    return value


def _whole(where: str, entry: dict[str, Any], key: str, *, default: int, most: int) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise _fault(f"{where}.{key} must be a whole number from 1 to {most}")
    return value


def _url(where: str, entry: dict[str, Any]) -> str:
    # The value is never echoed: a URL may carry credentials a user pasted by mistake.
    raw = _text(where, entry, "url", required=True)
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _fault(f"{where}.url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fault(f"{where}.url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise _fault(
            f"{where}.url must not carry credentials; set api_key_env to the name of the "
            "environment variable that holds the key"
        )
    if parts.query or parts.fragment:
        raise _fault(f"{where}.url must not have a query or a fragment")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        raise _fault(f"{where}.url must be the server's base URL, without /v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def _micros(where: str, entry: dict[str, Any]) -> int:
    if "price_per_hour" not in entry:
        raise _fault(f'{where}.price_per_hour is required (units per hour, e.g. "0.45")')
    value = entry["price_per_hour"]
    if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
        raise _fault(f'{where}.price_per_hour must be a decimal number, e.g. "0.45"')
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise _fault(f'{where}.price_per_hour must be a decimal number, e.g. "0.45"') from None
    if not price.is_finite():
        raise _fault(f"{where}.price_per_hour must be a finite number")
    if price < 0:
        raise _fault(f"{where}.price_per_hour must not be negative")
    if price > _MAX_PRICE:
        raise _fault(f"{where}.price_per_hour must be at most {_MAX_PRICE} units per hour")
    micros = price * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise _fault(f"{where}.price_per_hour has more than 6 decimal places")
    return int(micros)


def _key(where: str, name: str, env: Mapping[str, str]) -> UpstreamKey:
    if not _ENV_NAME.fullmatch(name):
        raise _fault(f"{where}.api_key_env must be the name of an environment variable")
    value = env.get(name, "").strip()
    if not value:
        raise _fault(f"{where}.api_key_env names {name}, which is not set")
    return UpstreamKey(value)


# --- the provider ------------------------------------------------------------------------------


def offer_of(endpoint: StaticEndpoint) -> GpuOffer:
    gpu = classify(endpoint.gpu_model)
    return GpuOffer(
        provider=ProviderName.STATIC,
        offer_id=endpoint.name,
        gpu_model=gpu.model,
        num_gpus=endpoint.num_gpus,
        vram_gb=endpoint.vram_gb,
        price_per_hour_micros=endpoint.price_per_hour_micros,
        location=endpoint.location,
        vendor=str(gpu.vendor),
        tier=str(gpu.tier),
    )


@contextlib.contextmanager
def _bus(action: str) -> Iterator[None]:
    try:
        yield
    except (KeyWrongLastSequenceError, KeyNotFoundError, NoKeysError):
        # Answers the caller acts on, not failures of the bus.
        raise
    except NatsError as exc:
        raise Unavailable(
            f"static endpoints: cannot {action} in the claims bucket ({type(exc).__name__})"
        ) from None


class StaticProvider(Provider):
    name = ProviderName.STATIC

    def __init__(self, endpoints: Sequence[StaticEndpoint], claims: KeyValue) -> None:
        self._endpoints = {endpoint.name: endpoint for endpoint in endpoints}
        self._claims = claims

    async def search(self, query: OfferQuery) -> builtins.list[GpuOffer]:
        taken = {machine.provider_id for machine in await self.list()}
        offers = [offer_of(e) for name, e in self._endpoints.items() if name not in taken]
        return sorted(offers, key=lambda offer: (offer.price_per_hour_micros, offer.offer_id))

    async def create(self, offer_id: str, spec: LaunchSpec, *, label: str) -> str:
        if offer_id not in self._endpoints:
            raise FailedPrecondition(f"offer {offer_id} is not a configured static endpoint")
        claim = StaticClaim(label=label, endpoint=offer_id, claimed_at_ms=time.time_ns() // 10**6)
        try:
            with _bus("claim an endpoint"):
                await self._claims.create(offer_id, msgspec.json.encode(claim))
        except KeyWrongLastSequenceError:
            raise FailedPrecondition(f"offer {offer_id} is already taken") from None
        return offer_id

    async def get(self, provider_id: str) -> Machine | None:
        if not _NAME.fullmatch(provider_id):
            return None
        claim = await self._claim(provider_id)
        return None if claim is None else self._machine(provider_id, claim)

    async def list(self) -> builtins.list[Machine]:
        try:
            with _bus("list claims"):
                names = await self._claims.keys()
        except NoKeysError:
            return []
        machines = []
        for name in sorted(names):
            claim = await self._claim(name)
            if claim is not None:
                machines.append(self._machine(name, claim))
        return machines

    async def destroy(self, provider_id: str) -> None:
        if not _NAME.fullmatch(provider_id):
            return
        with _bus("release an endpoint"):
            await self._claims.delete(provider_id)

    async def ready(self, machine: Machine, *, timeout: float = 5.0, key: str = "") -> bool:
        endpoint = self._endpoints.get(machine.provider_id)
        # The key goes only to the URL it was configured for.
        if endpoint is None or endpoint.api_key is None or machine.endpoint != endpoint.url:
            return await super().ready(machine, timeout=timeout)
        if machine.status is not MachineStatus.RUNNING:
            return False
        headers = {"Authorization": f"Bearer {endpoint.api_key.reveal()}"}
        try:
            async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
                answer = await client.get(f"{endpoint.url}/v1/models")
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    async def _claim(self, name: str) -> StaticClaim | None:
        try:
            with _bus("read a claim"):
                entry = await self._claims.get(name)
        except KeyNotFoundError:
            return None
        try:
            return msgspec.json.decode(entry.value or b"", type=StaticClaim)
        except msgspec.DecodeError:
            # Not written by us: report it unlabelled, so nothing treats it as its own.
            return StaticClaim(label="", endpoint=name, claimed_at_ms=0)

    def _machine(self, name: str, claim: StaticClaim) -> Machine:
        endpoint = self._endpoints.get(name)
        if endpoint is None:
            return Machine(
                provider_id=name,
                label=claim.label,
                status=MachineStatus.STOPPED,
                message=f"endpoint {name} is no longer configured",
            )
        return Machine(
            provider_id=name, label=claim.label, status=MachineStatus.RUNNING, endpoint=endpoint.url
        )


def from_env(env: Mapping[str, str], claims: KeyValue) -> StaticProvider | None:
    """The provider for the configured endpoints; None when none are configured."""
    endpoints = load_endpoints(env)
    return StaticProvider(endpoints, claims) if endpoints else None
