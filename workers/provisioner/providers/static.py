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
import time
from collections.abc import Iterator, Mapping, Sequence

import httpx
import msgspec
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from schemas.catalogue import classify
from schemas.errors import FailedPrecondition, Unavailable
from schemas.gpus import GpuOffer, LaunchSpec, OfferQuery, ProviderName
from workers.common.static_endpoints import (
    ENDPOINT_NAME,
    ENV_VAR,
    StaticEndpoint,
    UpstreamKey,
    load_endpoints,
)

from .base import Machine, MachineStatus, Provider

__all__ = [
    "ENV_VAR",
    "StaticEndpoint",
    "StaticProvider",
    "UpstreamKey",
    "from_env",
    "load_endpoints",
]


class StaticClaim(msgspec.Struct, frozen=True, kw_only=True):
    """What the claims bucket holds under an endpoint's name while it is rented."""

    label: str
    endpoint: str
    claimed_at_ms: int


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
        # A shared endpoint serves every account through the proxy: nobody rents it.
        self._endpoints = {e.name: e for e in endpoints if not e.shared}
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
        if not ENDPOINT_NAME.fullmatch(provider_id):
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
        if not ENDPOINT_NAME.fullmatch(provider_id):
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
    endpoints = [e for e in load_endpoints(env) if not e.shared]
    return StaticProvider(endpoints, claims) if endpoints else None
