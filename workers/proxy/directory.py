"""The machines a proxy worker may send inference to, and the models each serves.

A watcher keeps a copy of the instance registry (`gpuproxy-instances`, written by the
provisioner). A machine becomes a route once it is `running` with an endpoint and has told
which models it serves: its `/v1/models` is asked when it starts running and again every
`refresh_seconds`, so a machine that loads another model is followed. A machine that leaves
`running` stops being a route at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
from nats.js import JetStreamContext

from bus.records import follow
from bus.tasks import cancel_and_wait
from bus.topology import declare_bucket
from schemas import topology
from schemas.gpus import Instance, InstanceState
from workers.common.static_endpoints import StaticEndpoint
from workers.common.upstream_keys import UpstreamKeys

log = logging.getLogger("gpuproxy.proxy.directory")

REFRESH_SECONDS = 60.0
RETRY_SECONDS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
"""Pauses between asks of a machine that has not said what it serves yet."""


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """One machine that serves inference, as the proxy sees it."""

    instance_id: str
    owner: str
    provider: str
    endpoint: str
    models: tuple[str, ...]
    price_per_hour_micros: int = 0
    vram_gb: int = 0
    provider_id: str = ""
    """The provider's name for the machine (a static endpoint's configured name)."""
    shared: bool = False
    """Serves other accounts than its owner: those of `shared_with`, or every one."""
    shared_with: frozenset[str] = frozenset()
    """Roles or account ids a shared machine serves; empty: every account."""

    @property
    def trusted_loopback(self) -> bool:
        """The `sim` provider's machines are local processes: it vouches for their loopback
        address (and nothing else)."""
        return self.provider == "sim"

    def reachable_by(self, actor: str, admin: bool, role: str = "") -> bool:
        if admin or (self.owner and self.owner == actor):
            return True
        if not self.shared:
            return False
        return not self.shared_with or actor in self.shared_with or role in self.shared_with


class MachineKeys:
    """The API key a machine is called with: its own, derived, for one gpuproxy started; the
    configured one for a static endpoint (and only at the URL it was configured for)."""

    def __init__(self, keys: UpstreamKeys | None, endpoints: Iterable[StaticEndpoint] = ()) -> None:
        self._keys = keys
        self._static = {e.name: e for e in endpoints}

    def headers(self, route: Route) -> dict[str, str]:
        if route.provider == "static":
            endpoint = self._static.get(route.provider_id)
            if endpoint is None or endpoint.api_key is None or endpoint.url != route.endpoint:
                return {}
            return {"authorization": f"Bearer {endpoint.api_key.reveal()}"}
        if self._keys is None:
            return {}
        return {"authorization": f"Bearer {self._keys.of(route.instance_id)}"}


def shared_routes(endpoints: Iterable[StaticEndpoint]) -> list[Route]:
    """The configured endpoints marked `shared`: routes without a rental."""
    return [
        Route(
            instance_id=f"static-{e.name}",
            owner="",
            provider="static",
            provider_id=e.name,
            endpoint=e.url,
            models=(),
            price_per_hour_micros=e.price_per_hour_micros,
            vram_gb=e.vram_gb,
            shared=True,
            shared_with=e.shared_with,
        )
        for e in endpoints
        if e.shared
    ]


ModelsOf = Callable[[Route], Awaitable[tuple[str, ...]]]
"""Asks a machine which models it serves (its `/v1/models`)."""


class Directory:
    def __init__(
        self,
        js: JetStreamContext,
        models_of: ModelsOf,
        *,
        replicas: int = 1,
        refresh_seconds: float = REFRESH_SECONDS,
        extra: Iterable[Route] = (),
    ) -> None:
        self._js = js
        self._models_of = models_of
        self._replicas = replicas
        self._refresh = refresh_seconds
        self._routes: dict[str, Route] = {}
        self._learning: dict[str, asyncio.Task[None]] = {}
        self._extra = list(extra)
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None
        self._unlearned: set[str] = set()
        """Running machines not yet asked what they serve."""
        self._settled = asyncio.Event()
        self._settled.set()

    async def start(self) -> None:
        kv = await declare_bucket(self._js, topology.instances_bucket(self._replicas))
        self._watcher = await kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(
            follow(self._watcher, topology.INSTANCES_BUCKET, self._apply, loaded),
            name="proxy-directory",
        )
        await loaded
        for route in self._extra:
            self._learn(route)

    async def stop(self) -> None:
        await cancel_and_wait([t for t in (self._task, *self._learning.values()) if t])
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def get(self, instance_id: str) -> Route | None:
        return self._routes.get(instance_id)

    async def settled(self, timeout: float) -> None:
        """Wait (at most `timeout`) until every running machine has said what it serves: a
        request that comes the moment its machine started is not refused for the race."""
        if self._unlearned:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), timeout)

    def _learned(self, instance_id: str) -> None:
        self._unlearned.discard(instance_id)
        if not self._unlearned:
            self._settled.set()

    def _apply(self, key: str, revision: int, raw: bytes | None) -> None:
        instance = None
        if raw is not None:
            try:
                instance = msgspec.json.decode(raw, type=Instance)
            except msgspec.DecodeError:
                log.warning("instance %s holds a value this version cannot read", key)
        if instance is None or instance.state is not InstanceState.RUNNING:
            self._forget(key)
            return
        if not instance.endpoint:
            return
        current = self._routes.get(key)
        if current is not None and current.endpoint == instance.endpoint.rstrip("/"):
            if current.shared != instance.shared:
                self._routes[key] = msgspec.structs.replace(current, shared=instance.shared)
            return
        self._learn(
            Route(
                instance_id=instance.id,
                owner=instance.owner,
                provider=str(instance.provider),
                endpoint=instance.endpoint.rstrip("/"),
                models=(),
                price_per_hour_micros=instance.price_per_hour_micros,
                vram_gb=instance.vram_gb,
                provider_id=instance.provider_id,
                shared=instance.shared,
            )
        )

    def _forget(self, instance_id: str) -> None:
        task = self._learning.pop(instance_id, None)
        if task is not None:
            task.cancel()
        self._routes.pop(instance_id, None)
        self._learned(instance_id)

    def _learn(self, route: Route) -> None:
        if route.instance_id not in self._routes:
            self._unlearned.add(route.instance_id)
            self._settled.clear()
        previous = self._learning.pop(route.instance_id, None)
        if previous is not None:
            previous.cancel()
        self._learning[route.instance_id] = asyncio.create_task(
            self._keep_learning(route), name=f"models-{route.instance_id}"
        )

    async def _keep_learning(self, route: Route) -> None:
        tries = 0
        while True:
            try:
                models = await self._models_of(route)
            except Exception as exc:
                pause = RETRY_SECONDS[min(tries, len(RETRY_SECONDS) - 1)]
                tries += 1
                if tries == len(RETRY_SECONDS):
                    self._learned(route.instance_id)  # nobody waits for it any longer
                    log.warning(
                        "instance %s does not say which models it serves: %s",
                        route.instance_id,
                        type(exc).__name__,
                    )
                await asyncio.sleep(pause)
                continue
            tries = 0
            self._routes[route.instance_id] = msgspec.structs.replace(route, models=models)
            self._learned(route.instance_id)
            await asyncio.sleep(self._refresh)
