"""io.net's IO Cloud containers (CaaS) as a gpuproxy provider.

One gpuproxy machine is one CaaS *deployment* of one container replica. Every call goes through
`ApiClient` (timeouts, 429 backoff with Retry-After, 5xx -> Unavailable) with the key in the
`X-API-KEY` header. Paths, relative to `https://api.io.solutions` (io.net API reference,
io.net/docs/reference/caas/*):

- `GET /v1/io-cloud/caas/hardware` - the hardware catalogue, `data.hardware[]`. The path is the
  one our issue names; io.net documents the enterprise listing
  `/enterprise/v1/io-cloud/caas/hardware/max-gpus-per-container` (`hardware_id`,
  `hardware_name`, `brand_name`, `max_gpus_per_container`, `available`) and the public catalogue
  also carries `id`, `name`, `num_cards`, `vram_per_card`, `price`, `available_replicas` and
  `sold_out`. A row is read by either set of names.
- `GET /enterprise/v1/io-cloud/caas/available-replicas?hardware_id=&hardware_qty=` - replicas
  deployable per location (`data[] = {id, iso2, name, available_replicas}`) for that hardware
  with `hardware_qty` GPUs per container: one offer per location with room.
- `GET /enterprise/v1/io-cloud/caas/price?location_ids=[..]&hardware_id=&duration_hours=1&
  gpus_per_container=&replica_count=1` - only for a catalogue row without a `price`:
  `data.total_cost_usdc` for one hour of one replica, fees included.
- `POST /enterprise/v1/io-cloud/caas/deploy` - `{resource_private_name, duration_hours,
  gpus_per_container, hardware_id, location_ids, container_config: {replica_count,
  env_variables, traffic_port}, registry_config: {image_url}}` -> `{status, deployment_id}`.
- `GET /enterprise/v1/io-cloud/caas/deployment/{id}` - `data = {id, status, ..., container_config:
  {env_variables, traffic_port, image_url, ...}}`; 404 when unknown.
- `GET /enterprise/v1/io-cloud/caas/deployment/{id}/containers` - `data.workers[] = {container_id,
  status, public_url, container_events: [{time, message}], ...}`.
- `GET /enterprise/v1/io-cloud/caas/deployments?page=&page_size=` - `data = {deployments: [{id,
  status, name, ...}], total}`, active and past deployments.
- `DELETE /enterprise/v1/io-cloud/caas/deployment/{id}` - `{status, deployment_id}`; prepaid
  time beyond the first hour is refunded.

Decisions:
- Offer id `<hardware_id>@<location_id>x<gpus_per_container>`, e.g. `112@3x8`: everything a
  deploy needs, so a create makes exactly one call.
- Price: the catalogue's `price` is the whole configuration per hour (USD); JSON numbers become
  `Decimal(str(x))` and micros are rounded up, so a budget is never held short.
- The label is the deployment's `resource_private_name` (what the deployments list calls
  `name`). The details call does not return the name, so the label also travels as the
  environment variable `GPUPROXY_LABEL`, read back from `container_config.env_variables`.
- A deployment is prepaid for `duration_hours` (default 24, `IONET_DURATION_HOURS`); destroy
  ends it early and io.net refunds the unused time. `LaunchSpec.disk_gb` has no CaaS field.
- Status words (case folded): deployment `running` with a container `running` -> RUNNING (its
  `public_url` the endpoint); `running` without one yet, `deployment requested`, and any word
  not known -> CREATING (the provisioner's deadlines catch one that never moves);
  `completed`, `failed`, `termination requested`, `destroyed` (and kin) -> EXITED, the message
  the status and the containers' last event; `stopped` -> STOPPED. `list` leaves out destroyed
  deployments: they hold nothing.
- Errors: 401/403 -> FailedPrecondition telling to check IONET_API_KEY (the key is never in a
  message); any other refusal of a deploy (no capacity, hardware gone, validation) ->
  FailedPrecondition naming the offer with io.net's `detail`; 404 on get -> None, on destroy ->
  already destroyed.
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Mapping
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any, TypeVar

import httpx
import msgspec

from schemas.errors import ConfigError, FailedPrecondition, InvalidArgument, Unavailable
from schemas.gpus import DEFAULT_API_PORT, GpuOffer, LaunchSpec, OfferQuery, ProviderName
from workers.provisioner.providers.base import Machine, MachineStatus, Provider
from workers.provisioner.providers.http import ApiClient

DEFAULT_BASE_URL = "https://api.io.solutions"
DEFAULT_IMAGE = "vllm/vllm-openai:latest"
"""Serves the OpenAI-compatible API on port 8000 with vLLM's default model."""
DEFAULT_DURATION_HOURS = 24
LABEL_ENV = "GPUPROXY_LABEL"

HARDWARE_PATH = "/v1/io-cloud/caas/hardware"
CAAS_PATH = "/enterprise/v1/io-cloud/caas"
PAGE_SIZE = 100
MAX_PAGES = 1000

MICROS = Decimal(1_000_000)
_OFFER_ID = re.compile(r"(\d+)@(\d+)x(\d+)")
_DEPLOYMENT_ID = re.compile(r"[A-Za-z0-9-]{1,64}")

_RUNNING = frozenset({"running"})
_ENDED = frozenset(
    {
        "completed",
        "failed",
        "error",
        "terminated",
        "terminating",
        "termination requested",
        "destroyed",
        "cancelled",
        "canceled",
        "expired",
    }
)
_STOPPED = frozenset({"stopped", "paused", "suspended"})

_T = TypeVar("_T")


class _Hardware(msgspec.Struct, frozen=True):
    """One catalogue row, read from either of io.net's field names."""

    id: int
    model: str
    brand: str
    gpus: int
    vram_gb: int
    price_micros: int | None


class IoNetProvider(Provider):
    name = ProviderName.IONET

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 15.0,
        max_attempts: int = 5,
        backoff: float = 0.5,
        duration_hours: int = DEFAULT_DURATION_HOURS,
    ) -> None:
        if duration_hours < 1:
            raise ConfigError("io.net deployments last at least one hour", field="duration_hours")
        self._key = api_key
        self._duration_hours = duration_hours
        self._api = ApiClient(
            "io.net",
            base_url,
            {"X-API-KEY": api_key, "Accept": "application/json"},
            timeout=timeout,
            max_attempts=max_attempts,
            backoff=backoff,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> IoNetProvider | None:
        """The provider `IONET_API_KEY` configures, or None without a key (not offered)."""
        key = env.get("IONET_API_KEY", "").strip()
        if not key:
            return None
        raw_hours = env.get("IONET_DURATION_HOURS", "").strip()
        hours = DEFAULT_DURATION_HOURS
        if raw_hours:
            if not raw_hours.isdigit() or int(raw_hours) < 1:
                raise ConfigError(
                    f"IONET_DURATION_HOURS must be a whole number of hours >= 1, not {raw_hours!r}",
                    field="IONET_DURATION_HOURS",
                )
            hours = int(raw_hours)
        base_url = env.get("IONET_API_URL", "").strip() or DEFAULT_BASE_URL
        return cls(key, base_url=base_url, duration_hours=hours)

    async def search(self, query: OfferQuery) -> list[GpuOffer]:
        offers: list[GpuOffer] = []
        for hardware in await self._catalogue():
            if not _may_match(hardware, query):
                continue
            for place in await self._places(hardware):
                location = str(place.get("iso2", "")).upper()
                if query.location and not location.lower().startswith(query.location.lower()):
                    continue
                price = hardware.price_micros
                if price is None:
                    price = await self._quote(hardware, int(place["id"]))
                if price is None or (query.max_price_micros and price > query.max_price_micros):
                    continue
                offers.append(_offer(hardware, place, location, price))
        return offers

    async def create(self, offer_id: str, spec: LaunchSpec, *, label: str) -> str:
        hardware_id, location_id, gpus = _parse_offer(offer_id)
        body = {
            "resource_private_name": label,
            "duration_hours": self._duration_hours,
            "gpus_per_container": gpus,
            "hardware_id": hardware_id,
            "location_ids": [location_id],
            "container_config": {
                "replica_count": 1,
                "env_variables": {**spec.env, LABEL_ENV: label},
                "traffic_port": spec.ports[0] if spec.ports else DEFAULT_API_PORT,
            },
            "registry_config": {"image_url": spec.image or DEFAULT_IMAGE},
        }
        response = await self._api.request("POST", f"{CAAS_PATH}/deploy", json=body)
        self._refuse_key(response, f"the deploy of offer {offer_id}")
        if response.status_code >= 400:
            raise FailedPrecondition(
                self._scrub(f"io.net cannot deploy offer {offer_id}{_detail(response)}")
            )
        answer = self._json(response, "deploy")
        deployment_id = answer.get("deployment_id") if isinstance(answer, dict) else None
        if not isinstance(deployment_id, str) or not _DEPLOYMENT_ID.fullmatch(deployment_id):
            raise Unavailable(f"io.net accepted the deploy of offer {offer_id} without an id")
        return deployment_id

    async def get(self, provider_id: str) -> Machine | None:
        path = _deployment_path(provider_id)
        response = await self._api.request("GET", path)
        if response.status_code == 404:
            return None
        self._refuse(response, f"the status of deployment {provider_id}")
        details = _field(self._json(response, "deployment details"), "data", dict)
        status = str(details.get("status", ""))
        return await self._machine(provider_id, _label(details), status, explain=True)

    async def list(self) -> list[Machine]:
        machines: list[Machine] = []
        seen: set[str] = set()
        for page in range(MAX_PAGES):
            response = await self._api.request(
                "GET",
                f"{CAAS_PATH}/deployments",
                params={"page": str(page), "page_size": str(PAGE_SIZE)},
            )
            self._refuse(response, "the deployments list")
            data = _field(self._json(response, "deployments list"), "data", dict)
            fresh = [
                item
                for item in _field(data, "deployments", list)
                if isinstance(item, dict) and str(item.get("id", "")) not in seen
            ]
            if not fresh:
                break
            for item in fresh:
                deployment_id, status = str(item["id"]), str(item.get("status", ""))
                seen.add(deployment_id)
                if status.strip().lower() == "destroyed" or not _DEPLOYMENT_ID.fullmatch(
                    deployment_id
                ):
                    continue
                label = str(item.get("name") or item.get("resource_private_name") or "")
                machines.append(await self._machine(deployment_id, label, status, explain=False))
            total = data.get("total")
            if isinstance(total, int) and len(seen) >= total:
                break
        return machines

    async def destroy(self, provider_id: str) -> None:
        response = await self._api.request("DELETE", _deployment_path(provider_id))
        if response.is_success or response.status_code == 404:
            return
        self._refuse_key(response, f"the destroy of deployment {provider_id}")
        # io.net refuses a second delete of a deployment that is already ending.
        machine = await self.get(provider_id)
        if machine is None or machine.status is MachineStatus.EXITED:
            return
        raise FailedPrecondition(
            self._scrub(f"io.net refused to destroy deployment {provider_id}{_detail(response)}")
        )

    async def close(self) -> None:
        await self._api.close()

    async def _catalogue(self) -> builtins.list[_Hardware]:
        response = await self._api.request("GET", HARDWARE_PATH)
        self._refuse(response, "the hardware catalogue")
        rows = _field(_field(self._json(response, "hardware"), "data", dict), "hardware", list)
        return [hardware for row in rows if (hardware := _hardware(row)) is not None]

    async def _places(self, hardware: _Hardware) -> builtins.list[dict[str, Any]]:
        """Locations with at least one replica free for this hardware and GPU count."""
        response = await self._api.request(
            "GET",
            f"{CAAS_PATH}/available-replicas",
            params={"hardware_id": str(hardware.id), "hardware_qty": str(hardware.gpus)},
        )
        self._refuse(response, f"the availability of hardware {hardware.id}")
        rows = _field(self._json(response, "available replicas"), "data", list)
        return [
            row
            for row in rows
            if isinstance(row, dict)
            and _integer(row.get("id")) is not None
            and (_integer(row.get("available_replicas")) or 0) > 0
        ]

    async def _quote(self, hardware: _Hardware, location_id: int) -> int | None:
        """One hour of one replica, fees included, from io.net's price check."""
        response = await self._api.request(
            "GET",
            f"{CAAS_PATH}/price",
            params={
                "location_ids": json.dumps([location_id]),
                "hardware_id": str(hardware.id),
                "duration_hours": "1",
                "gpus_per_container": str(hardware.gpus),
                "replica_count": "1",
            },
        )
        self._refuse(response, f"the price of hardware {hardware.id}")
        data = _field(self._json(response, "price"), "data", dict)
        return _micros(data.get("total_cost_usdc"))

    async def _machine(
        self, deployment_id: str, label: str, status: str, *, explain: bool
    ) -> Machine:
        word = status.strip().lower()

        def machine(status: MachineStatus, message: str = "", endpoint: str = "") -> Machine:
            return Machine(
                provider_id=deployment_id,
                label=label,
                status=status,
                message=message,
                endpoint=endpoint,
            )

        if word in _RUNNING:
            workers = await self._workers(deployment_id)
            running = [w for w in workers if str(w.get("status", "")).lower() in _RUNNING]
            if not running:
                waiting = _last_event(workers) or "waiting for its container to run"
                return machine(MachineStatus.CREATING, waiting)
            urls = (str(w.get("public_url") or "") for w in running)
            endpoint = next((u for u in urls if u.startswith(("https://", "http://"))), "")
            return machine(MachineStatus.RUNNING, endpoint=endpoint.rstrip("/"))
        if word in _ENDED:
            event = _last_event(await self._workers(deployment_id)) if explain else ""
            return machine(MachineStatus.EXITED, f"{word}: {event}" if event else word)
        if word in _STOPPED:
            return machine(MachineStatus.STOPPED, word)
        return machine(MachineStatus.CREATING, word)

    async def _workers(self, deployment_id: str) -> builtins.list[dict[str, Any]]:
        response = await self._api.request("GET", f"{_deployment_path(deployment_id)}/containers")
        if response.status_code == 404:
            return []
        self._refuse(response, f"the containers of deployment {deployment_id}")
        data = _field(self._json(response, "containers"), "data", dict)
        return [w for w in _field(data, "workers", list) if isinstance(w, dict)]

    def _refuse_key(self, response: httpx.Response, what: str) -> None:
        if response.status_code in (401, 403):
            raise FailedPrecondition(
                self._scrub(
                    f"io.net refused the API key ({response.status_code}) for {what}"
                    f"{_detail(response)}; check IONET_API_KEY"
                )
            )

    def _refuse(self, response: httpx.Response, what: str) -> None:
        self._refuse_key(response, what)
        if response.status_code >= 400:
            raise FailedPrecondition(
                self._scrub(f"io.net refused {what} ({response.status_code}){_detail(response)}")
            )

    def _json(self, response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise Unavailable(f"io.net answered the {what} call with something not JSON") from None

    def _scrub(self, message: str) -> str:
        """io.net's own words may quote the request; the key never leaves this object."""
        return message.replace(self._key, "***") if self._key else message


def from_env(env: Mapping[str, str]) -> IoNetProvider | None:
    return IoNetProvider.from_env(env)


def _deployment_path(provider_id: str) -> str:
    if not _DEPLOYMENT_ID.fullmatch(provider_id):
        raise InvalidArgument(f"not an io.net deployment id: {provider_id!r}", field="provider_id")
    return f"{CAAS_PATH}/deployment/{provider_id}"


def _parse_offer(offer_id: str) -> tuple[int, int, int]:
    match = _OFFER_ID.fullmatch(offer_id)
    if match is None or int(match[3]) < 1:
        raise InvalidArgument(
            f"not an io.net offer id (<hardware_id>@<location_id>x<gpus>): {offer_id!r}",
            field="offer_id",
        )
    return int(match[1]), int(match[2]), int(match[3])


def _hardware(row: object) -> _Hardware | None:
    """A catalogue row that can be deployed, or None (no usable id, sold out, none free)."""
    if not isinstance(row, dict) or row.get("sold_out") is True:
        return None
    hardware_id = _integer(row.get("hardware_id", row.get("id")))
    free = _integer(row.get("available_replicas", row.get("available")))
    if hardware_id is None or free == 0:
        return None
    gpus = _integer(row.get("num_cards", row.get("max_gpus_per_container"))) or 1
    return _Hardware(
        id=hardware_id,
        model=str(row.get("hardware_name") or row.get("name") or "").strip(),
        brand=str(row.get("brand_name") or "").strip(),
        gpus=gpus,
        vram_gb=_integer(row.get("vram_per_card")) or 0,
        price_micros=_micros(row.get("price")),
    )


def _may_match(hardware: _Hardware, query: OfferQuery) -> bool:
    """The filters that spare availability calls; the provisioner applies them all again."""
    if query.gpu_model and query.gpu_model.lower() not in hardware.model.lower():
        return False
    if query.vendor and not hardware.brand.lower().startswith(query.vendor.lower()):
        return False
    if query.min_vram_gb and hardware.vram_gb < query.min_vram_gb:
        return False
    if query.min_gpus and hardware.gpus < query.min_gpus:
        return False
    price = hardware.price_micros
    return not (query.max_price_micros and price is not None and price > query.max_price_micros)


def _offer(hardware: _Hardware, place: dict[str, Any], location: str, price: int) -> GpuOffer:
    location_id = int(place["id"])
    return GpuOffer(
        provider=ProviderName.IONET,
        offer_id=f"{hardware.id}@{location_id}x{hardware.gpus}",
        gpu_model=hardware.model,
        num_gpus=hardware.gpus,
        vram_gb=hardware.vram_gb,
        price_per_hour_micros=price,
        location=location,
        vendor=hardware.brand,
        metadata={
            "hardware_id": str(hardware.id),
            "location_id": str(location_id),
            "location_name": str(place.get("name", "")),
            "available_replicas": str(place.get("available_replicas", "")),
        },
    )


def _label(details: dict[str, Any]) -> str:
    config = details.get("container_config")
    env = config.get("env_variables") if isinstance(config, dict) else None
    if isinstance(env, dict) and isinstance(env.get(LABEL_ENV), str):
        return str(env[LABEL_ENV])
    return str(details.get("name") or details.get("resource_private_name") or "")


def _last_event(workers: list[dict[str, Any]]) -> str:
    """The latest container event's message across the deployment's containers."""
    events = [
        event
        for worker in workers
        for event in (worker.get("container_events") or [])
        if isinstance(event, dict) and event.get("message")
    ]
    if not events:
        return ""
    return str(max(events, key=lambda event: str(event.get("time", "")))["message"])[:300]


def _detail(response: httpx.Response) -> str:
    """io.net's reason: FastAPI's `detail`, a string or a list of `{loc, msg}`."""
    try:
        body = response.json()
    except ValueError:
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        detail = "; ".join(
            str(item.get("msg", "")) + _where(item.get("loc"))
            for item in detail
            if isinstance(item, dict)
        )
    return f": {str(detail)[:300]}" if detail else ""


def _where(loc: object) -> str:
    if not isinstance(loc, list) or not loc:
        return ""
    return f" ({'.'.join(str(part) for part in loc)})"


def _field(body: object, name: str, kind: type[_T]) -> _T:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, kind):
        raise Unavailable(f"io.net answered without the expected {name!r} field")
    return value


def _integer(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _micros(value: object) -> int | None:
    """USD per hour as integer micros, rounded up; None for anything not a price."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount <= 0:
        return None
    return int((amount * MICROS).to_integral_value(rounding=ROUND_CEILING))
