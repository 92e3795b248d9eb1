"""The proxy worker application: the directory of machines, the upstream pool, inference."""

from __future__ import annotations

from collections.abc import Mapping

from faststream import FastStream
from nats.aio.client import Client

from bus.events import EventPublisher
from bus.runtime import Handler
from bus.topology import declare_stream
from schemas import topology
from schemas.commands import (
    CommandBase,
    GetLoad,
    GetStrategy,
    Inference,
    ListModels,
    Ping,
    SetStrategy,
)
from schemas.subjects import WorkerKind
from workers.common.app import worker_app
from workers.common.config import WorkerConfig
from workers.common.ping import answer_ping
from workers.common.upstream_keys import UpstreamKeys
from workers.proxy.addresses import parse_allow_list
from workers.proxy.config import ProxyConfig
from workers.proxy.directory import Directory, MachineKeys, shared_routes
from workers.proxy.inference import InferenceHandler
from workers.proxy.models import ModelCatalogue, ModelsAsker
from workers.proxy.routing import Balancer
from workers.proxy.strategies import LoadReport, Strategies
from workers.proxy.upstream_client import UpstreamPool

MODELS_TIMEOUT = 5.0
MACHINE_CONNECTIONS = 1024
"""Connections one proxy replica opens to one machine at most: a vLLM server batches
hundreds of requests, and a request waits for a free connection only past this."""


class ProxyService:
    def __init__(self, worker: WorkerConfig, config: ProxyConfig) -> None:
        self._worker = worker
        self._config = config
        self._pool: UpstreamPool | None = None
        self._directory: Directory | None = None
        self._balancer: Balancer | None = None
        self._strategies: Strategies | None = None

    @property
    def directory(self) -> Directory:
        assert self._directory is not None, "ProxyService.start() was not awaited"
        return self._directory

    async def start(self, nc: Client) -> Mapping[type[CommandBase], Handler]:
        js = nc.jetstream()
        replicas = self._worker.stream_replicas
        await declare_stream(js, topology.event_stream(replicas))
        self._pool = UpstreamPool(
            allow=parse_allow_list(self._config.upstream_allow),
            max_connections=MACHINE_CONNECTIONS,
        )
        secret = self._config.upstream_secret
        endpoints = self._config.static_endpoints
        keys = MachineKeys(UpstreamKeys(secret) if secret else None, endpoints)
        self._directory = Directory(
            js,
            ModelsAsker(self._pool, keys, timeout=MODELS_TIMEOUT),
            replicas=replicas,
            refresh_seconds=self._config.models_refresh_seconds,
            extra=shared_routes(endpoints),
        )
        await self._directory.start()
        events = EventPublisher(js)
        self._balancer = Balancer(
            nc,
            replica=self._worker.worker_id,
            events=events,
            request_timeout=self._config.request_timeout,
        )
        await self._balancer.start()
        self._strategies = Strategies(js, setting=self._config.strategy, replicas=replicas)
        await self._strategies.start()
        inference = InferenceHandler(
            self._directory,
            self._pool,
            self._balancer,
            self._config.prices,
            events,
            keys,
            self._strategies,
            request_timeout=self._config.request_timeout,
            models=self._config.model_routes,
        )
        return {
            Inference: inference,
            ListModels: ModelCatalogue(self._directory, self._config.model_routes),
            SetStrategy: self._strategies.set,
            GetStrategy: self._strategies.get,
            GetLoad: LoadReport(self._balancer, self._directory, self._strategies),
        }

    async def stop(self) -> None:
        if self._strategies is not None:
            await self._strategies.stop()
        if self._balancer is not None:
            await self._balancer.stop()
        if self._directory is not None:
            await self._directory.stop()
        if self._pool is not None:
            await self._pool.close()


def build(config: WorkerConfig, proxy: ProxyConfig | None = None) -> FastStream:
    service = ProxyService(config, proxy or ProxyConfig())
    return worker_app(WorkerKind.PROXY, {Ping: answer_ping}, config, service)
