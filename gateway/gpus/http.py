"""HTTP routes of GPUs: offers, instances, batches, reservations, catalogue, preferences.

`GET /api/v1/gpu/instances` lists *offers* (the original API's meaning): each `id` is what
`POST /api/v1/gpu/instances/{provider}/{id}` rents. The caller's rented instances are at
`GET /api/v1/gpu/instances/mine`. Every route names the query parameters it takes; any other
is refused. `?user_id=` follows the accounts' one rule (`AccountService.acting_for`), and a
list of an admin may say `all`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.accounts.service import AccountService
from gateway.auth import principal
from gateway.auth.http_guard import HttpGuard
from gateway.auth.policy import ADMIN, GPUS
from gateway.gpus import requests
from gateway.gpus.preferences import PreferencesBody, PreferenceStore
from gateway.gpus.requests import FilterBody
from gateway.gpus.service import GpuService
from gateway.gpus.views import instance_json, offer_json, reservation_json
from gateway.http_io import body, json_response
from gateway.http_query import Endpoint, only
from schemas import catalogue
from schemas.errors import InvalidArgument
from schemas.gpus import OfferQuery
from schemas.replies import BatchCreated, ReservationView

IDEMPOTENCY_KEY = "Idempotency-Key"
OFFER_FILTERS = (
    "provider",
    "min_vram",
    "max_price",
    "max_price_micros",
    "gpu_model",
    "location",
    "vendor",
    "tier",
    "limit",
)
LIST_FILTERS = ("include_ended", "user_id")


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    image: str = ""
    env: dict[str, str] = {}
    ports: list[int] = []
    disk_gb: int = 0


class ShareBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    shared: bool


class CreateBody(Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class BatchBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    vastai_count: int = 0
    ionet_count: int = 0
    counts: dict[str, int] = {}
    """Any provider by name, e.g. {"sim": 2}."""
    config: Config = Config()
    filters: FilterBody = FilterBody()


class ReserveBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    count: int
    filters: FilterBody = FilterBody()
    config: Config = Config()
    strategy: str = ""
    lease_seconds: int | None = None
    ready_timeout_seconds: int | None = None


class RenewBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    lease_seconds: int


def _spec(config: Config, prefix: str) -> Any:
    return requests.spec(
        image=config.image,
        env=config.env,
        ports=config.ports,
        disk_gb=config.disk_gb,
        prefix=prefix,
    )


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise InvalidArgument("must be true or false", field=name)


def _query_of(request: Request) -> OfferQuery:
    params = request.query_params
    price = 0
    if params.get("max_price"):
        price = requests.max_price_micros(params["max_price"], field="max_price")
    if params.get("max_price_micros"):
        raw = params["max_price_micros"]
        if not raw.isdigit():
            raise InvalidArgument("must be a whole number of micro-units", field="max_price_micros")
        price = int(raw)
    limit_raw = params.get("limit", "0")
    if not limit_raw.isdigit() or int(limit_raw) > 1000:
        raise InvalidArgument("must be a whole number up to 1000", field="limit")
    query = requests.query(
        provider_text=params.get("provider", ""),
        min_vram=params.get("min_vram", "0") or "0",
        max_price_micros=price,
        gpu_model=params.get("gpu_model", ""),
        location=params.get("location", ""),
        vendor=params.get("vendor", ""),
        tier=params.get("tier", ""),
    )
    return msgspec.structs.replace(query, limit=int(limit_raw))


def _reservation_answer(view: ReservationView) -> dict[str, Any]:
    return reservation_json(view.reservation, view.instances)


def routes(
    guard: HttpGuard, gpus: GpuService, preferences: PreferenceStore, accounts: AccountService
) -> list[Route]:
    async def owner(request: Request) -> str:
        return await accounts.acting_for(
            principal.current(), request.query_params.get("user_id", ""), every_account=True
        )

    async def own_account(request: Request) -> str:
        """Preferences belong to one account: `all` means nothing there."""
        return await accounts.acting_for(
            principal.current(), request.query_params.get("user_id", "")
        )

    async def offers(request: Request) -> Response:
        found = await gpus.search(principal.current(), _query_of(request))
        return json_response(
            200,
            {
                "instances": [offer_json(o) for o in found.offers],
                "total_count": len(found.offers),
                "unavailable_providers": found.unavailable,
            },
        )

    async def one(request: Request) -> Response:
        provider = requests.provider(request.path_params["provider"])
        id = requests.identifier(request.path_params["id"], field="instance_id")
        found = await gpus.find(principal.current(), provider, id)
        if found.instance is not None:
            return json_response(200, {"instance": instance_json(found.instance)})
        assert found.offer is not None
        return json_response(200, {"instance": offer_json(found.offer)})

    async def create(request: Request) -> Response:
        provider = requests.provider(request.path_params["provider"])
        offer_id = requests.identifier(request.path_params["id"], field="instance_id")
        spec = _spec(await body(request, CreateBody), "")
        made = await gpus.create(
            principal.current(),
            provider,
            offer_id,
            spec,
            request.headers.get(IDEMPOTENCY_KEY),
            IDEMPOTENCY_KEY,
        )
        return json_response(
            201, {"instance": instance_json(made.instance), "message": made.message}
        )

    async def destroy(request: Request) -> Response:
        provider = requests.provider(request.path_params["provider"])
        instance_id = requests.identifier(request.path_params["id"], field="instance_id")
        done = await gpus.destroy(
            principal.current(),
            provider,
            instance_id,
            request.headers.get(IDEMPOTENCY_KEY),
            IDEMPOTENCY_KEY,
        )
        return json_response(
            200,
            {
                "success": True,
                "message": done.message,
                "instance": instance_json(done.instance),
            },
        )

    async def share(request: Request) -> Response:
        instance_id = requests.identifier(request.path_params["id"], field="instance_id")
        asked = await body(request, ShareBody)
        done = await gpus.share(principal.current(), instance_id, asked.shared)
        return json_response(
            200, {"message": done.message, "instance": instance_json(done.instance)}
        )

    async def mine(request: Request) -> Response:
        listed = await gpus.instances(
            principal.current(), await owner(request), include_ended=_flag(request, "include_ended")
        )
        return json_response(
            200,
            {
                "instances": [instance_json(i) for i in listed.instances],
                "total_count": len(listed.instances),
            },
        )

    async def batch(request: Request) -> Response:
        batch_body = await body(request, BatchBody)
        made: BatchCreated = await gpus.batch(
            principal.current(),
            requests.batch_counts(
                batch_body.counts, vastai=batch_body.vastai_count, ionet=batch_body.ionet_count
            ),
            batch_body.filters.checked("filters."),
            _spec(batch_body.config, "config."),
            request.headers.get(IDEMPOTENCY_KEY),
            IDEMPOTENCY_KEY,
        )
        return json_response(
            201 if made.instances else 412,
            {
                "instances": [instance_json(i) for i in made.instances],
                "failures": [
                    {
                        "provider": str(f.provider),
                        "code": str(f.error.code),
                        "message": f.error.message,
                    }
                    for f in made.failures
                ],
            },
        )

    async def reserve(request: Request) -> Response:
        reserve_body = await body(request, ReserveBody)
        view = await gpus.reserve(
            principal.current(),
            count=requests.count(reserve_body.count),
            query=reserve_body.filters.checked("filters."),
            spec=_spec(reserve_body.config, "config."),
            strategy=requests.strategy(reserve_body.strategy),
            lease_seconds=(
                requests.lease_seconds(reserve_body.lease_seconds)
                if reserve_body.lease_seconds is not None
                else None
            ),
            ready_seconds=requests.ready_seconds(reserve_body.ready_timeout_seconds),
            idempotency_key=request.headers.get(IDEMPOTENCY_KEY),
            key_field=IDEMPOTENCY_KEY,
        )
        answer = _reservation_answer(view)
        return json_response(
            201,
            {
                "reservation": answer,
                "reserved_instances": answer["instances"],
                "reserved_count": len(view.instances),
            },
        )

    async def reservations(request: Request) -> Response:
        views = await gpus.reservations(
            principal.current(), await owner(request), include_ended=_flag(request, "include_ended")
        )
        return json_response(
            200,
            {
                "reservations": [_reservation_answer(v) for v in views],
                "total_count": len(views),
            },
        )

    def _reservation_id(request: Request) -> str:
        return requests.identifier(request.path_params["id"], field="reservation_id")

    async def reservation(request: Request) -> Response:
        view = await gpus.reservation(principal.current(), _reservation_id(request))
        return json_response(200, {"reservation": _reservation_answer(view)})

    async def renew(request: Request) -> Response:
        renew_body = await body(request, RenewBody)
        view = await gpus.renew(
            principal.current(),
            _reservation_id(request),
            requests.lease_seconds(renew_body.lease_seconds),
        )
        return json_response(200, {"reservation": _reservation_answer(view)})

    async def release(request: Request) -> Response:
        view = await gpus.release(principal.current(), _reservation_id(request))
        return json_response(200, {"reservation": _reservation_answer(view)})

    async def classify(request: Request) -> Response:
        name = request.query_params.get("name", "").strip()
        if not name:
            raise InvalidArgument("name a GPU, e.g. ?name=RTX 4090", field="name")
        if len(name) > 200:
            raise InvalidArgument("must be at most 200 characters", field="name")
        return json_response(200, msgspec.to_builtins(catalogue.classify(name)))

    async def groups(request: Request) -> Response:
        return json_response(200, {"groups": msgspec.to_builtins(catalogue.groups())})

    async def available(request: Request) -> Response:
        vendor = request.query_params.get("vendor", "").strip().lower()
        tier = request.query_params.get("tier", "").strip().lower()
        if vendor and vendor not in {str(v) for v in catalogue.Vendor}:
            raise InvalidArgument(
                f"one of {', '.join(str(v) for v in catalogue.Vendor)}", field="vendor"
            )
        if tier and tier not in {str(t) for t in catalogue.Tier}:
            raise InvalidArgument(
                f"one of {', '.join(str(t) for t in catalogue.Tier)}", field="tier"
            )
        found = await gpus.search(principal.current(), OfferQuery(vendor=vendor, tier=tier))
        return json_response(
            200,
            {
                "instances": [offer_json(o) for o in found.offers],
                "total_count": len(found.offers),
                "unavailable_providers": found.unavailable,
            },
        )

    async def get_preferences(request: Request) -> Response:
        found = await preferences.of(await own_account(request))
        return json_response(200, {"preferences": msgspec.to_builtins(found)})

    async def set_preferences(request: Request) -> Response:
        wanted = (await body(request, PreferencesBody)).preferences()
        stored = await preferences.put(await own_account(request), wanted)
        return json_response(200, {"preferences": msgspec.to_builtins(stored)})

    def route(path: str, endpoint: Endpoint, method: str, params: tuple[str, ...] = ()) -> Route:
        return guard.route(
            f"/api/v1/gpu{path}", only(endpoint, params), methods=[method], requirement=GPUS
        )

    return [
        route("/instances", offers, "GET", OFFER_FILTERS),
        route("/instances/mine", mine, "GET", LIST_FILTERS),
        route("/instances/batch", batch, "POST"),
        route("/instances/reserve", reserve, "POST"),
        # Before `{provider}/{id}`, which its path would otherwise match.
        guard.route(
            "/api/v1/gpu/instances/{id}/share",
            only(share),
            methods=["POST"],
            requirement=ADMIN,
        ),
        route("/instances/{provider}/{id}", one, "GET"),
        route("/instances/{provider}/{id}", create, "POST"),
        route("/instances/{provider}/{id}", destroy, "DELETE"),
        route("/reservations", reservations, "GET", LIST_FILTERS),
        route("/reservations/{id}", reservation, "GET"),
        route("/reservations/{id}/renew", renew, "POST"),
        route("/reservations/{id}/release", release, "POST"),
        route("/classify", classify, "GET", ("name",)),
        route("/groups", groups, "GET"),
        route("/available", available, "GET", ("vendor", "tier")),
        route("/preferences", get_preferences, "GET", ("user_id",)),
        route("/preferences", set_preferences, "POST", ("user_id",)),
    ]
