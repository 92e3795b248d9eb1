"""Which load-balancing strategy each account's requests are routed by.

An account's own choice wins; then the default an admin set for everyone; then the
`LB_STRATEGY` setting. Choices live in the `gpuproxy-balancing` bucket, which every proxy
replica watches, so a change reaches all of them within moments, and survives restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bus.records import follow
from bus.runtime import Context
from bus.tasks import cancel_and_wait
from bus.topology import declare_bucket
from schemas import topology
from schemas.balancing import InstanceLoad, LoadInfo, Strategy, strategy_named
from schemas.commands import GetLoad, GetStrategy, SetStrategy
from schemas.errors import NotFound, PermissionDenied
from schemas.replies import LoadView, StrategyView
from workers.proxy.directory import Directory
from workers.proxy.routing import Balancer

DEFAULT_KEY = "default"


def _user_key(user_id: str) -> str:
    return f"user.{user_id}"


class Strategies:
    def __init__(self, js: JetStreamContext, *, setting: Strategy, replicas: int = 1) -> None:
        self._js = js
        self._setting = setting
        self._replicas = replicas
        self._chosen: dict[str, Strategy] = {}
        self._kv: KeyValue | None = None
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._kv = await declare_bucket(self._js, topology.balancing_bucket(self._replicas))
        self._watcher = await self._kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(
            follow(self._watcher, topology.BALANCING_BUCKET, self._apply, loaded),
            name="proxy-strategies",
        )
        await loaded

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()

    def _apply(self, key: str, revision: int, raw: bytes | None) -> None:
        if raw is None:
            self._chosen.pop(key, None)
            return
        with contextlib.suppress(ValueError):  # a name a newer version knows: ignored
            self._chosen[key] = Strategy(raw.decode())

    def of(self, user_id: str) -> tuple[Strategy, str]:
        """The strategy for `user_id`'s requests, and where it comes from."""
        mine = self._chosen.get(_user_key(user_id))
        if mine is not None:
            return mine, "account"
        default = self._chosen.get(DEFAULT_KEY)
        if default is not None:
            return default, "default"
        return self._setting, "setting"

    async def set(self, command: SetStrategy, ctx: Context) -> StrategyView:
        strategy = strategy_named(command.strategy)
        if command.fleet_default:
            if not command.actor_admin:
                raise PermissionDenied("only an admin sets the default strategy", field="scope")
            key = DEFAULT_KEY
        else:
            owner = command.owner or command.actor
            if owner != command.actor and not command.actor_admin:
                raise PermissionDenied("another account's strategy", field="user_id")
            key = _user_key(owner)
        assert self._kv is not None
        await self._kv.put(key, str(strategy).encode())
        self._chosen[key] = strategy  # this replica at once; the others by the watch
        return StrategyView(
            strategy=str(strategy), source="default" if command.fleet_default else "account"
        )

    async def get(self, command: GetStrategy, ctx: Context) -> StrategyView:
        strategy, source = self.of(command.owner or command.actor)
        return StrategyView(strategy=str(strategy), source=source)


class LoadReport:
    """`GetLoadInfo`: the shared load book, limited to the machines the actor can reach."""

    def __init__(self, balancer: Balancer, directory: Directory, strategies: Strategies) -> None:
        self._balancer = balancer
        self._directory = directory
        self._strategies = strategies

    async def __call__(self, command: GetLoad, ctx: Context) -> LoadView:
        info = self._balancer.book.load_info()
        known = {row.instance_id: row for row in info.instances}
        reachable = [
            r
            for r in self._directory.routes()
            if r.reachable_by(command.actor, command.actor_admin)
        ]
        # A machine that has served nothing yet is in the report too, idle.
        rows = [known.get(r.instance_id) or _idle(r.instance_id, r.provider) for r in reachable]
        if command.instance_id:
            rows = [row for row in rows if row.instance_id == command.instance_id]
            if not rows:
                raise NotFound(
                    f"no running instance {command.instance_id} of yours serves inference",
                    field="instance_id",
                )
        providers = {row.provider for row in rows}
        strategy, _ = self._strategies.of(command.owner or command.actor)
        return LoadView(
            load=LoadInfo(
                instances=sorted(rows, key=lambda row: row.instance_id),
                providers=[p for p in info.providers if p.provider in providers],
            ),
            strategy=str(strategy),
        )


def _idle(instance_id: str, provider: str) -> InstanceLoad:
    return InstanceLoad(
        instance_id=instance_id,
        provider=provider,
        in_flight=0,
        routed=0,
        finished=0,
        avg_response_ms=None,
        ttft_ms=None,
        error_rate=0.0,
        load_score=0.0,
    )
