"""Which models a caller can reach right now, and what each machine says it serves."""

from __future__ import annotations

import msgspec

from bus.runtime import Context
from schemas.commands import ListModels
from schemas.inference import ModelList, ServedModel
from workers.proxy.directory import Directory, MachineKeys, Route
from workers.proxy.model_routes import ModelRoutes
from workers.proxy.upstream_client import UpstreamPool


class ModelCatalogue:
    def __init__(self, directory: Directory, routes: ModelRoutes | None = None) -> None:
        self._directory = directory
        self._routes = routes or ModelRoutes()

    async def __call__(self, command: ListModels, ctx: Context) -> ModelList:
        counts: dict[str, int] = {}
        for route in self._directory.routes():
            if route.reachable_by(command.actor, command.actor_admin, command.actor_role):
                for model in route.models:
                    counts[model] = counts.get(model, 0) + 1
        for alias, model in self._routes.aliases.items():
            if model in counts:
                counts[alias] = counts[model]
        return ModelList(models=[ServedModel(id=m, instances=n) for m, n in sorted(counts.items())])


class _Listed(msgspec.Struct):
    id: str


class _Models(msgspec.Struct):
    data: list[_Listed]


class ModelsUnknown(Exception):
    """A machine did not answer which models it serves."""


class ModelsAsker:
    """Asks a machine's `/v1/models` through the same guarded pool inference uses."""

    def __init__(self, pool: UpstreamPool, keys: MachineKeys, *, timeout: float) -> None:
        self._pool = pool
        self._keys = keys
        self._timeout = timeout

    async def __call__(self, route: Route) -> tuple[str, ...]:
        response = await self._pool.request(
            route.instance_id,
            route.endpoint + "/v1/models",
            method="GET",
            headers=self._keys.headers(route),
            body=b"",
            timeout=self._timeout,
            trusted_loopback=route.trusted_loopback,
        )
        try:
            raw = await response.read()
        finally:
            await response.aclose()
        if response.status != 200:
            raise ModelsUnknown(f"/v1/models answered {response.status}")
        try:
            listed = msgspec.json.decode(raw, type=_Models)
        except msgspec.DecodeError as exc:
            raise ModelsUnknown("/v1/models answered something else than a model list") from exc
        return tuple(m.id for m in listed.data)
