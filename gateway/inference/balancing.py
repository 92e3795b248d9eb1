"""Load-balancer control on both doors: the strategy per account (and the admins' default for
all) and the shared load book, read through the proxy worker.

    GET /api/v1/loadbalancer/strategy[?user_id=]   the strategy in force and its source
    PUT /api/v1/loadbalancer/strategy[?user_id=]   {"strategy": ..., "scope": "account" | "default"}
    GET /api/v1/loadbalancer/loads                 every machine you can reach, and providers
    GET /api/v1/loadbalancer/load?instance_id=     one machine

gRPC: `SetLoadBalancerStrategy` (the caller's account) and `GetLoadInfo`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bus.caller import CommandCaller
from gateway import validation
from gateway.accounts.service import AccountService
from gateway.auth import principal
from gateway.auth.http_guard import HttpGuard
from gateway.auth.policy import INFERENCE
from gateway.auth.principal import Principal
from gateway.config import GatewayConfig
from gateway.http_io import body, json_response
from gateway.http_query import only
from schemas.balancing import LoadInfo, strategy_named
from schemas.commands import GetLoad, GetStrategy, SetStrategy
from schemas.errors import InvalidArgument
from schemas.replies import LoadView, StrategyView
from schemas.subjects import WorkerKind

IDEMPOTENCY_KEY = "Idempotency-Key"


class StrategyBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    strategy: str
    scope: Literal["account", "default"] = "account"


class Balancing:
    def __init__(self, caller: CommandCaller, config: GatewayConfig) -> None:
        self._caller = caller
        self._config = config

    def _id(self, who: Principal) -> str:
        return validation.command_id(None, field=IDEMPOTENCY_KEY, owner=who.user_id)

    async def set(
        self, who: Principal, strategy: str, *, owner: str, fleet_default: bool
    ) -> StrategyView:
        command = SetStrategy(
            command_id=self._id(who),
            actor=who.user_id,
            actor_admin=who.is_admin,
            strategy=str(strategy_named(strategy)),
            owner="" if fleet_default else owner,
            fleet_default=fleet_default,
        )
        reply = await self._caller.call(
            WorkerKind.PROXY, command, timeout=self._config.request_timeout
        )
        assert isinstance(reply, StrategyView)
        return reply

    async def get(self, who: Principal, *, owner: str) -> StrategyView:
        command = GetStrategy(
            command_id=self._id(who), actor=who.user_id, actor_admin=who.is_admin, owner=owner
        )
        reply = await self._caller.call(
            WorkerKind.PROXY, command, timeout=self._config.request_timeout
        )
        assert isinstance(reply, StrategyView)
        return reply

    async def load(self, who: Principal, *, instance_id: str = "") -> LoadView:
        command = GetLoad(
            command_id=self._id(who),
            actor=who.user_id,
            actor_admin=who.is_admin,
            instance_id=instance_id,
        )
        reply = await self._caller.call(
            WorkerKind.PROXY, command, timeout=self._config.request_timeout
        )
        assert isinstance(reply, LoadView)
        return reply


def load_json(info: LoadInfo) -> dict[str, Any]:
    return {
        "instances": [msgspec.to_builtins(row) for row in info.instances],
        "providers": [msgspec.to_builtins(row) for row in info.providers],
    }


def routes(guard: HttpGuard, balancing: Balancing, accounts: AccountService) -> list[Route]:
    async def owner(request: Request) -> str:
        return await accounts.acting_for(
            principal.current(), request.query_params.get("user_id", "")
        )

    async def get_strategy(request: Request) -> Response:
        view = await balancing.get(principal.current(), owner=await owner(request))
        return json_response(200, {"strategy": view.strategy, "source": view.source})

    async def put_strategy(request: Request) -> Response:
        asked = await body(request, StrategyBody)
        view = await balancing.set(
            principal.current(),
            asked.strategy,
            owner=await owner(request),
            fleet_default=asked.scope == "default",
        )
        return json_response(200, {"strategy": view.strategy, "source": view.source})

    async def loads(request: Request) -> Response:
        view = await balancing.load(principal.current())
        return json_response(200, {**load_json(view.load), "strategy": view.strategy})

    async def load(request: Request) -> Response:
        instance_id = request.query_params.get("instance_id", "")
        if not instance_id:
            raise InvalidArgument("name the instance", field="instance_id")
        view = await balancing.load(principal.current(), instance_id=instance_id)
        return json_response(200, {**load_json(view.load), "strategy": view.strategy})

    path = "/api/v1/loadbalancer"
    return [
        guard.route(
            f"{path}/strategy",
            only(get_strategy, ("user_id",)),
            methods=["GET"],
            requirement=INFERENCE,
        ),
        guard.route(
            f"{path}/strategy",
            only(put_strategy, ("user_id",)),
            methods=["PUT"],
            requirement=INFERENCE,
        ),
        guard.route(f"{path}/loads", only(loads), methods=["GET"], requirement=INFERENCE),
        guard.route(
            f"{path}/load", only(load, ("instance_id",)), methods=["GET"], requirement=INFERENCE
        ),
    ]
