"""A local vast.ai: the REST endpoints the `vastai` adapter calls, shaped like the real ones.

Served by uvicorn on 127.0.0.1 (port 0: the kernel picks a free one) inside the test's event
loop, under `/api/v0`:

- `POST /bundles/`: filters its offers by the query object (eq, neq, gt, gte, lt, lte, in,
  notin; `geolocation` by its country code), orders, limits -> `{"offers": [...]}`. A
  `"type": "bid"` search quotes each offer that has a `min_bid` at that price.
- `PUT /asks/{id}/`: rents the offer -> `{"success": true, "new_contract": id}`; an offer
  already rented answers 410 `no_such_ask`, an unknown one 404, in the shapes vast.ai uses.
- `GET /instances?owner=me`, `GET /instances/{id}/`: every look at an instance moves it one
  step along created -> loading -> running (`steps_per_status` looks per step); once running it
  has a public address and a random host port for every `-p` port it was started with.
- `DELETE /instances/{id}/`: destroys; an unknown id answers 404 `no_such_instance`.

Every request is recorded (method, path, query, JSON body, Authorization header). A request
without the right bearer key answers 401 with a body that repeats the key it was given: the
worst a provider could do, so tests prove the adapter never passes it on.

Steering: `throttle(n, retry_after=...)` answers 429 to the next n requests; `fail(n, status,
body)` answers the next n with that status and JSON body; `delay` holds
every answer that many seconds; `take(offer)` lets another renter take an offer; `outbid`,
`exit` and `vanish` change an instance as vast.ai would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

PROGRESSION = ("created", "loading", "running")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda have, want: have == want,
    "neq": lambda have, want: have != want,
    "gt": lambda have, want: have is not None and have > want,
    "gte": lambda have, want: have is not None and have >= want,
    "lt": lambda have, want: have is not None and have < want,
    "lte": lambda have, want: have is not None and have <= want,
    "in": lambda have, want: have in want,
    "notin": lambda have, want: have not in want,
}
_NOT_FILTERS = {"order", "type", "limit", "allocated_storage", "disable_bundling"}


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    """Below `/api/v0`, e.g. `/asks/101/`."""
    query: dict[str, str]
    body: Any
    authorization: str


class _Server(uvicorn.Server):
    # The test run owns the signals.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class FakeVastAi:
    def __init__(
        self, api_key: str, *, steps_per_status: int = 1, public_ip: str = "127.0.0.1"
    ) -> None:
        self.api_key = api_key
        self.steps_per_status = steps_per_status
        self.public_ip = public_ip
        self.offers: dict[int, dict[str, Any]] = {}
        self.instances: dict[int, dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self.delay = 0.0
        self.url = ""
        """Base URL of the API, `http://127.0.0.1:<port>/api/v0`, once started."""
        self._throttled = 0
        self._retry_after: float | None = None
        self._failures: list[tuple[int, dict[str, Any]]] = []
        self._looks: dict[int, int] = {}
        self._contracts = itertools.count(7_000_001)
        self._host_ports = itertools.count(41_000)
        self._closing = asyncio.Event()
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    # -- steering -------------------------------------------------------------------------

    def add_offer(self, ask_id: int, **fields: Any) -> dict[str, Any]:
        offer: dict[str, Any] = {
            "id": ask_id,
            "machine_id": ask_id + 500,
            "gpu_name": "RTX 4090",
            "num_gpus": 1,
            "gpu_ram": 24564,
            "cpu_cores": 16,
            "cpu_ram": 64000,
            "disk_space": 200.0,
            "dph_total": 0.4123,
            "min_bid": None,
            "geolocation": "Washington, US",
            "rentable": True,
            "rented": False,
            "verified": True,
            "inet_down": 912.5,
            "inet_up": 640.2,
            "reliability2": 0.9987,
            "cuda_max_good": 12.4,
        }
        offer.update(fields)
        self.offers[ask_id] = offer
        return offer

    def throttle(self, count: int, *, retry_after: float | None = None) -> None:
        """Answer 429 to the next `count` requests, with `Retry-After` when given."""
        self._throttled = count
        self._retry_after = retry_after

    def fail(self, count: int, status: int, body: dict[str, Any]) -> None:
        """Answer the next `count` requests (after any 429s) with `status` and `body`."""
        self._failures.extend([(status, body)] * count)

    def take(self, ask_id: int) -> None:
        """Another renter takes the offer."""
        self.offers[ask_id]["rented"] = True

    def outbid(self, instance_id: int) -> None:
        """A higher bid takes the machine of an interruptible instance."""
        self.instances[instance_id].update(
            actual_status="stopped", cur_state="stopped", next_state="stopped", status_msg=""
        )

    def exit(self, instance_id: int, status_msg: str) -> None:
        self.instances[instance_id].update(actual_status="exited", status_msg=status_msg)

    def vanish(self, instance_id: int) -> None:
        """vast.ai no longer has the instance (destroyed elsewhere)."""
        del self.instances[instance_id]

    def bodies(self, method: str, path_prefix: str) -> list[Any]:
        return [
            r.body for r in self.requests if r.method == method and r.path.startswith(path_prefix)
        ]

    def host_port(self, instance_id: int, container_port: int) -> int:
        bindings = self.instances[instance_id]["ports"][f"{container_port}/tcp"]
        return int(bindings[0]["HostPort"])

    # -- serving --------------------------------------------------------------------------

    async def start(self) -> str:
        app = Starlette(
            routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT", "DELETE"])]
        )
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(), name="fake-vastai")
        # uvicorn has no "started" event to await; its flag flips once the socket listens.
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the fake vast.ai stopped before it listened")
            await asyncio.sleep(0.005)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api/v0"
        return self.url

    async def stop(self) -> None:
        self._closing.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task

    async def __aenter__(self) -> FakeVastAi:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- the API --------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        body = await request.json() if await request.body() else None
        authorization = request.headers.get("authorization", "")
        self.requests.append(
            Recorded(
                request.method,
                path.removeprefix("/api/v0"),
                dict(request.query_params),
                body,
                authorization,
            )
        )
        if self.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.delay)
        if self._throttled > 0:
            self._throttled -= 1
            headers = {} if self._retry_after is None else {"Retry-After": f"{self._retry_after:g}"}
            return PlainTextResponse("API requests too frequent", status_code=429, headers=headers)
        if self._failures:
            status, failure = self._failures.pop(0)
            return JSONResponse(failure, status_code=status)
        if authorization != f"Bearer {self.api_key}":
            presented = authorization.removeprefix("Bearer ")
            return _refuse(401, "auth_error", f"Invalid user key {presented}")
        if not path.startswith("/api/v0/"):
            return _refuse(404, "not_found", f"no route {path}")
        parts = [p for p in path.removeprefix("/api/v0/").split("/") if p]
        match request.method, parts:
            case "POST", ["bundles"]:
                return self._search(body if isinstance(body, dict) else {})
            case "PUT", ["asks", ask] if ask.isdigit():
                return self._rent(int(ask), body if isinstance(body, dict) else {})
            case "GET", ["instances"]:
                rows = [self._look(i) for i in list(self.instances)]
                return JSONResponse({"instances_found": len(rows), "instances": rows})
            case "GET", ["instances", ident] if ident.isdigit():
                if int(ident) not in self.instances:
                    return _refuse(404, "no_such_instance", f"Instance {ident} not found.")
                return JSONResponse({"instances": self._look(int(ident))})
            case "DELETE", ["instances", ident] if ident.isdigit():
                if self.instances.pop(int(ident), None) is None:
                    return _refuse(404, "no_such_instance", f"Instance {ident} not found.")
                return JSONResponse({"success": True})
        return _refuse(404, "not_found", f"no route {request.method} {path}")

    def _search(self, query: dict[str, Any]) -> Response:
        bid = query.get("type") == "bid"
        found = []
        for offer in self.offers.values():
            row = dict(offer)
            if bid:
                if row["min_bid"] is None:
                    continue
                row["dph_total"] = row["min_bid"]
            if all(
                _matches(row, field, test)
                for field, test in query.items()
                if field not in _NOT_FILTERS
            ):
                found.append(row)
        for field, direction in reversed(query.get("order", [])):
            found.sort(key=lambda row: row[field], reverse=direction == "desc")
        return JSONResponse({"offers": found[: int(query.get("limit", 64))]})

    def _rent(self, ask_id: int, body: dict[str, Any]) -> Response:
        offer = self.offers.get(ask_id)
        if offer is None:
            return _refuse(
                404,
                "invalid_args",
                f"error 404/3603: no_such_ask Instance type by id {ask_id} is not available.",
                ask_id=ask_id,
            )
        if offer["rented"]:
            return _refuse(
                410,
                "no_such_ask",
                f"error 410/3907: no_such_ask Instance type {ask_id} is no longer available.",
                ask_id=ask_id,
            )
        offer["rented"] = True
        contract = next(self._contracts)
        env = body.get("env") or {}
        self.instances[contract] = {
            "id": contract,
            "machine_id": offer["machine_id"],
            "label": body.get("label"),
            "actual_status": None,
            "intended_status": "running",
            "cur_state": "running",
            "next_state": "running",
            "status_msg": None,
            "image_uuid": body.get("image"),
            "image_runtype": body.get("runtype"),
            "extra_env": [[key, value] for key, value in env.items()],
            "onstart": body.get("onstart"),
            "disk_space": body.get("disk"),
            "is_bid": body.get("price") is not None,
            "dph_total": body["price"] if body.get("price") is not None else offer["dph_total"],
            "gpu_name": offer["gpu_name"],
            "num_gpus": offer["num_gpus"],
            "geolocation": offer["geolocation"],
            "public_ipaddr": None,
            "ports": {},
        }
        self._looks[contract] = 0
        return JSONResponse({"success": True, "new_contract": contract})

    def _look(self, instance_id: int) -> dict[str, Any]:
        """The instance as a look at it finds it; a look moves a starting one on."""
        row = self.instances[instance_id]
        if row["actual_status"] in (None, *PROGRESSION[:-1]) and row["cur_state"] == "running":
            looks = self._looks.get(instance_id, 0)
            self._looks[instance_id] = looks + 1
            row["actual_status"] = PROGRESSION[
                min(looks // self.steps_per_status, len(PROGRESSION) - 1)
            ]
            if row["actual_status"] == "running":
                self._open_ports(row)
        return dict(row)

    def _open_ports(self, row: dict[str, Any]) -> None:
        row["public_ipaddr"] = f"{self.public_ip}\n"  # vast.ai's own addresses may end in one
        row["status_msg"] = f"success, running {row['image_uuid']}/{row['image_runtype']}"
        for key, _ in row["extra_env"]:
            if key.startswith("-p "):
                container = key.split(":")[-1].split("/")[0]
                row["ports"][f"{container}/tcp"] = [
                    {"HostIp": "0.0.0.0", "HostPort": str(next(self._host_ports))}
                ]


def _matches(row: dict[str, Any], field: str, test: Any) -> bool:
    if not isinstance(test, dict):
        return True
    have = row.get(field)
    if field == "geolocation" and isinstance(have, str):
        have = have.rpartition(",")[2].strip()
    return all(_OPS[op](have, want) for op, want in test.items())


def _refuse(status: int, error: str, msg: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"success": False, "error": error, "msg": msg, **extra}, status_code=status)
