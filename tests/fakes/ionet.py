"""A local io.net IO Cloud (CaaS) API, shaped like the endpoints the `ionet` adapter calls.

Paths, bodies and answers follow io.net's API reference (io.net/docs/reference/caas/*; the
adapter's module docstring lists them): a hardware catalogue, replicas free per location, the
price check, deploy, deployment details, its containers, the deployments list and delete.
Errors answer as io.net's FastAPI does: `{"detail": "..."}`, or `{"detail": [{loc, msg, type}]}`
for a body that does not validate (422).

It runs uvicorn in a thread with its own event loop on a socket bound to port 0, so a test on
any loop can use it and no two fakes share a port. Controls, set from the test:
- `locations`, `hardware`: the supply (`add_location`, `add_hardware`, `no_capacity`).
- `polls_to_run`: details reads a new deployment answers before it runs.
- `api_key` / `forbidden_keys`: a wrong key gets 401, a forbidden one 403.
- `throttle(n)`: the next n requests get 429 with Retry-After.
- `delay`: seconds every answer waits (client timeouts).
- `end(deployment_id, status, message)`: a deployment fails or completes, with a container event.
- `requests`: every request received (method, path, query, JSON body, key header).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

CAAS = "/enterprise/v1/io-cloud/caas"
IONET_FEE = Decimal("0.0025")
"""io.net's 0.25% reservation fee, added by the price check."""


@dataclass
class FakeLocation:
    id: int
    iso2: str
    name: str


@dataclass
class FakeHardware:
    id: int
    name: str
    brand: str = "NVIDIA"
    num_cards: int = 1
    vram_per_card: int = 24
    price: float | None = 1.0
    """Whole configuration per hour, as the catalogue lists it; None: not listed."""
    quote: float | None = None
    """Per hour before fees, as the price check computes it; None: `price`."""
    replicas: dict[int, int] = field(default_factory=dict)
    """Free replicas per location id."""


@dataclass
class FakeDeployment:
    id: str
    name: str
    hardware: FakeHardware
    location_ids: list[int]
    gpus_per_container: int
    duration_hours: int
    container_config: dict[str, Any]
    registry_config: dict[str, Any]
    status: str = "DEPLOYMENT REQUESTED"
    polls: int = 0
    events: list[dict[str, str]] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: _now())


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    api_key: str


class IoNetFake:
    def __init__(self, *, api_key: str = "ionet-test-key-5f0c9e", polls_to_run: int = 2) -> None:
        self.api_key = api_key
        self.forbidden_keys: set[str] = set()
        self.polls_to_run = polls_to_run
        self.delay = 0.0
        self.retry_after = "0"
        self.locations: dict[int, FakeLocation] = {}
        self.hardware: dict[int, FakeHardware] = {}
        self.deployments: dict[str, FakeDeployment] = {}
        self.requests: list[ReceivedRequest] = []
        self.url = ""
        self._throttled = 0
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/io-cloud/caas/hardware", self._guard(self._catalogue, keyed=False)),
                Route(f"{CAAS}/available-replicas", self._guard(self._available)),
                Route(f"{CAAS}/price", self._guard(self._price)),
                Route(f"{CAAS}/deploy", self._guard(self._deploy), methods=["POST"]),
                Route(f"{CAAS}/deployments", self._guard(self._list)),
                Route(
                    f"{CAAS}/deployment/{{deployment_id}}",
                    self._guard(self._deployment),
                    methods=["GET", "DELETE"],
                ),
                Route(
                    f"{CAAS}/deployment/{{deployment_id}}/containers",
                    self._guard(self._containers),
                ),
            ]
        )

    # Controls.

    def add_location(self, location_id: int, iso2: str, name: str) -> FakeLocation:
        location = FakeLocation(location_id, iso2, name)
        self.locations[location_id] = location
        return location

    def add_hardware(self, hardware: FakeHardware) -> FakeHardware:
        self.hardware[hardware.id] = hardware
        return hardware

    def no_capacity(self, hardware_id: int) -> None:
        with self._lock:
            hardware = self.hardware[hardware_id]
            hardware.replicas = dict.fromkeys(hardware.replicas, 0)

    def throttle(self, count: int, *, retry_after: str = "0") -> None:
        """Answer the next `count` requests with 429."""
        with self._lock:
            self._throttled = count
            self.retry_after = retry_after

    def end(self, deployment_id: str, *, status: str = "FAILED", message: str = "") -> None:
        with self._lock:
            deployment = self.deployments[deployment_id]
            deployment.status = status
            if message:
                deployment.events.append({"time": _now(), "message": message})

    def received(self, method: str, path_suffix: str) -> list[ReceivedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    # Lifecycle.

    def start(self) -> str:
        self._socket = socket.socket()
        # Accepted connections inherit it; without it every answer waits ~40 ms on Nagle.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.bind(("127.0.0.1", 0))
        port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the io.net fake did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> IoNetFake:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # The API.

    def _guard(self, handler: Any, *, keyed: bool = True) -> Any:
        """Record, delay, throttle and check the key before the endpoint itself answers."""

        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            key = request.headers.get("x-api-key", "")
            with self._lock:
                self.requests.append(
                    ReceivedRequest(
                        request.method, request.url.path, dict(request.query_params), body, key
                    )
                )
                throttled = self._throttled > 0
                self._throttled -= 1 if throttled else 0
            if self.delay:
                await asyncio.sleep(self.delay)
            if throttled:
                return JSONResponse(
                    {"detail": "Too many requests"},
                    status_code=429,
                    headers={"Retry-After": self.retry_after},
                )
            if keyed and key in self.forbidden_keys:
                return _error(403, "Not enough permissions")
            if keyed and key != self.api_key:
                return _error(401, "Invalid API key")
            with self._lock:
                answer: Response = handler(request, body)
            return answer

        return endpoint

    def _catalogue(self, request: Request, body: Any) -> Response:
        rows = []
        for hardware in self.hardware.values():
            free = sum(hardware.replicas.values())
            row: dict[str, Any] = {
                "id": hardware.id,
                "name": hardware.name,
                "brand_name": hardware.brand,
                "num_cards": hardware.num_cards,
                "vram_per_card": hardware.vram_per_card,
                "available_replicas": free,
                "sold_out": free == 0,
            }
            if hardware.price is not None:
                row["price"] = hardware.price
            rows.append(row)
        return JSONResponse({"data": {"hardware": rows, "total": len(rows)}})

    def _available(self, request: Request, body: Any) -> Response:
        params = _query_ints(request, "hardware_id", "hardware_qty")
        if isinstance(params, Response):
            return params
        hardware = self.hardware.get(params["hardware_id"])
        if hardware is None or params["hardware_qty"] > hardware.num_cards:
            return JSONResponse({"data": []})
        rows = [
            {"id": loc.id, "iso2": loc.iso2, "name": loc.name, "available_replicas": free}
            for location_id, free in hardware.replicas.items()
            if (loc := self.locations.get(location_id)) is not None
        ]
        return JSONResponse({"data": rows})

    def _price(self, request: Request, body: Any) -> Response:
        params = _query_ints(
            request, "hardware_id", "duration_hours", "gpus_per_container", "replica_count"
        )
        if isinstance(params, Response):
            return params
        try:
            location_ids = json.loads(request.query_params.get("location_ids", ""))
        except ValueError:
            location_ids = None
        if not isinstance(location_ids, list) or not location_ids:
            return JSONResponse(
                {
                    "detail": [
                        {
                            "loc": ["query", "location_ids"],
                            "msg": "list of ids in a form of json array",
                            "type": "value_error",
                        }
                    ]
                },
                status_code=422,
            )
        hardware = self.hardware.get(params["hardware_id"])
        if hardware is None:
            return _error(404, "Hardware not found")
        hourly = hardware.quote if hardware.quote is not None else hardware.price
        base = Decimal(str(hourly)) * params["duration_hours"] * params["replica_count"]
        fee = base * IONET_FEE
        data = {
            "replica_count": params["replica_count"],
            "gpus_per_container": params["gpus_per_container"],
            "available_replica_count": [sum(hardware.replicas.values())],
            "discount": 0,
            "ionet_fee": float(fee),
            "ionet_fee_percent": float(IONET_FEE * 100),
            "currency_conversion_fee": 0,
            "currency_conversion_fee_percent": 0,
            "total_cost_usdc": float(base + fee),
        }
        return JSONResponse({"data": data})

    def _deploy(self, request: Request, body: Any) -> Response:
        missing = _missing(
            body,
            (
                "resource_private_name",
                "duration_hours",
                "gpus_per_container",
                "hardware_id",
                "location_ids",
                "container_config",
                "registry_config",
            ),
        )
        if missing:
            return missing
        container, registry = body["container_config"], body["registry_config"]
        missing = _missing(container, ("replica_count", "traffic_port"), "container_config")
        missing = missing or _missing(registry, ("image_url",), "registry_config")
        if missing:
            return missing
        hardware = self.hardware.get(body["hardware_id"])
        if hardware is None:
            return _error(400, f"Hardware {body['hardware_id']} is not available")
        if body["gpus_per_container"] > hardware.num_cards:
            return _error(400, f"{hardware.name} offers at most {hardware.num_cards} GPUs")
        wanted = container["replica_count"]
        places = [i for i in body["location_ids"] if hardware.replicas.get(i, 0) > 0]
        if sum(hardware.replicas.get(i, 0) for i in places) < wanted:
            return _error(
                400, "Not enough available replicas for the selected hardware and locations"
            )
        hardware.replicas[places[0]] -= wanted
        deployment = FakeDeployment(
            id=str(uuid.uuid4()),
            name=body["resource_private_name"],
            hardware=hardware,
            location_ids=list(body["location_ids"]),
            gpus_per_container=body["gpus_per_container"],
            duration_hours=body["duration_hours"],
            container_config=container,
            registry_config=registry,
        )
        self.deployments[deployment.id] = deployment
        return JSONResponse({"status": "DEPLOYMENT REQUESTED", "deployment_id": deployment.id})

    def _deployment(self, request: Request, body: Any) -> Response:
        deployment = self.deployments.get(request.path_params["deployment_id"])
        if deployment is None:
            return _error(404, "Deployment not found")
        if request.method == "DELETE":
            if deployment.status in ("TERMINATION REQUESTED", "DESTROYED"):
                return _error(400, "Deployment is already terminated")
            deployment.status = "TERMINATION REQUESTED"
            return JSONResponse({"status": "TERMINATION REQUESTED", "deployment_id": deployment.id})
        _advance(deployment, self.polls_to_run)
        return JSONResponse({"data": self._details(deployment)})

    def _details(self, deployment: FakeDeployment) -> dict[str, Any]:
        hardware, config = deployment.hardware, deployment.container_config
        replicas = config["replica_count"]
        return {
            "id": deployment.id,
            "status": deployment.status,
            "created_at": deployment.created_at,
            "started_at": deployment.created_at if deployment.status == "RUNNING" else None,
            "finished_at": None,
            "amount_paid": 1.0,
            "completed_percent": 0.0,
            "total_gpus": deployment.gpus_per_container * replicas,
            "gpus_per_container": deployment.gpus_per_container,
            "total_containers": replicas,
            "hardware_name": hardware.name,
            "hardware_id": hardware.id,
            "locations": [
                {"id": loc.id, "iso2": loc.iso2, "name": loc.name}
                for i in deployment.location_ids
                if (loc := self.locations.get(i)) is not None
            ],
            "brand_name": hardware.brand,
            "compute_minutes_served": 0,
            "compute_minutes_remaining": deployment.duration_hours * 60,
            "container_config": {
                "entrypoint": config.get("entrypoint"),
                "env_variables": config.get("env_variables"),
                "traffic_port": config["traffic_port"],
                "image_url": deployment.registry_config["image_url"],
                "secret_env_keys": sorted(config.get("secret_env_variables") or {}),
            },
        }

    def _containers(self, request: Request, body: Any) -> Response:
        deployment = self.deployments.get(request.path_params["deployment_id"])
        if deployment is None:
            return _error(404, "Deployment not found")
        running = deployment.status == "RUNNING"
        status = {"RUNNING": "RUNNING", "DEPLOYMENT REQUESTED": "DEPLOYING"}.get(
            deployment.status, "TERMINATED"
        )
        worker = {
            "device_id": str(uuid.uuid5(uuid.NAMESPACE_URL, deployment.id)),
            "container_id": f"{deployment.id[:8]}-0",
            "hardware": deployment.hardware.name,
            "brand_name": deployment.hardware.brand,
            "created_at": deployment.created_at,
            "uptime_percent": 100.0 if running else 0.0,
            "gpus_per_container": deployment.gpus_per_container,
            "status": status,
            "container_events": deployment.events or None,
            "public_url": f"https://{deployment.id}.caas.fake.test/" if running else None,
        }
        return JSONResponse({"data": {"total": 1, "workers": [worker]}})

    def _list(self, request: Request, body: Any) -> Response:
        page = int(request.query_params.get("page", "0"))
        size = min(int(request.query_params.get("page_size", "10")), 100)
        everything = list(self.deployments.values())
        rows = [
            {
                "id": d.id,
                "status": d.status,
                "name": d.name,
                "completed_percent": 0.0,
                "hardware_quantity": d.gpus_per_container,
                "brand_name": d.hardware.brand,
                "hardware_name": d.hardware.name,
                "compute_minutes_served": 0,
                "compute_minutes_remaining": d.duration_hours * 60,
                "created_at": d.created_at,
            }
            for d in everything[page * size : (page + 1) * size]
        ]
        statuses = sorted({d.status for d in everything})
        return JSONResponse(
            {"data": {"deployments": rows, "total": len(everything), "statuses": statuses}}
        )


def _advance(deployment: FakeDeployment, polls_to_run: int) -> None:
    """Each details read moves a deployment on: requested -> running, terminating -> gone."""
    deployment.polls += 1
    if deployment.status == "DEPLOYMENT REQUESTED" and deployment.polls > polls_to_run:
        deployment.status = "RUNNING"
        deployment.events.append({"time": _now(), "message": "Container started"})
    elif deployment.status == "TERMINATION REQUESTED":
        deployment.status = "DESTROYED"


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _missing(body: Any, names: tuple[str, ...], where: str = "") -> JSONResponse | None:
    """FastAPI's 422 for required body fields that are absent."""
    prefix = ["body", where] if where else ["body"]
    if not isinstance(body, dict):
        return JSONResponse(
            {"detail": [{"loc": prefix, "msg": "Input should be an object", "type": "dict_type"}]},
            status_code=422,
        )
    errors = [
        {"loc": [*prefix, name], "msg": "Field required", "type": "missing"}
        for name in names
        if name not in body
    ]
    return JSONResponse({"detail": errors}, status_code=422) if errors else None


def _query_ints(request: Request, *names: str) -> dict[str, int] | Response:
    values: dict[str, int] = {}
    errors = []
    for name in names:
        raw = request.query_params.get(name)
        if raw is None or not raw.isdigit():
            errors.append({"loc": ["query", name], "msg": "Field required", "type": "missing"})
        else:
            values[name] = int(raw)
    if errors:
        return JSONResponse({"detail": errors}, status_code=422)
    return values


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()
