"""The provisioner worker application: providers, registry, reservations and reconciler."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from faststream import FastStream
from nats.aio.client import Client

from bus.events import EventPublisher
from bus.runtime import Handler
from bus.topology import declare_bucket, declare_stream
from schemas import topology
from schemas.commands import CommandBase, Ping
from schemas.subjects import WorkerKind
from workers.common.app import worker_app
from workers.common.config import WorkerConfig
from workers.common.ping import answer_ping
from workers.common.upstream_keys import UpstreamKeys
from workers.provisioner.config import ProvisionerConfig
from workers.provisioner.fleet import Fleet
from workers.provisioner.handlers import Provisioning
from workers.provisioner.instances import Launcher
from workers.provisioner.lease import Lease
from workers.provisioner.metering import Meter
from workers.provisioner.providers.configured import configured_providers
from workers.provisioner.reconciler import Reconciler
from workers.provisioner.registry import Registry
from workers.provisioner.reservations import Reservations

log = logging.getLogger("gpuproxy.provisioner")


class ProvisionerService:
    def __init__(
        self, worker: WorkerConfig, config: ProvisionerConfig, env: Mapping[str, str]
    ) -> None:
        self._worker = worker
        self._config = config
        self._env = env
        self._registry: Registry | None = None
        self._fleet: Fleet | None = None
        self._provisioning: Provisioning | None = None
        self.reconciler: Reconciler | None = None

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "ProvisionerService.start() was not awaited"
        return self._registry

    async def start(self, nc: Client) -> Mapping[type[CommandBase], Handler]:
        js = nc.jetstream()
        replicas = self._worker.stream_replicas
        await declare_stream(js, topology.event_stream(replicas))
        events = EventPublisher(js)
        providers = await configured_providers(js, self._config, self._env, replicas=replicas)
        log.info("providers offered: %s", ", ".join(providers) or "none")
        self._fleet = Fleet(providers, search_seconds=self._config.search_seconds)
        self._registry = Registry(js, events, self._config, replicas)
        await self._registry.start()
        keys = self._config.upstream_secret
        launcher = Launcher(
            self._registry,
            self._fleet,
            worker_id=self._worker.worker_id,
            keys=UpstreamKeys(keys) if keys else None,
        )
        reservations = Reservations(self._registry, self._fleet, launcher, self._config)
        self._provisioning = Provisioning(
            self._registry,
            self._fleet,
            launcher,
            reservations,
            start_seconds=self._config.start_seconds,
        )
        leases = await declare_bucket(
            js, topology.leases_bucket(replicas, ttl_seconds=self._config.lease_seconds)
        )
        self.reconciler = Reconciler(
            self._registry,
            self._fleet,
            launcher,
            reservations,
            Meter(self._registry, events),
            Lease(leases, "provisioner-reconciler", self._worker.worker_id),
            self._config,
        )
        # Before the first command: a restart must not report a machine running that is gone.
        await self.reconciler.check_machines(self._config.search_seconds)
        self.reconciler.start()
        return self._provisioning.handlers()

    async def stop(self) -> None:
        if self.reconciler is not None:
            await self.reconciler.stop()
        if self._provisioning is not None:
            await self._provisioning.stop()
        if self._registry is not None:
            await self._registry.stop()
        if self._fleet is not None:
            await self._fleet.close()


def build(
    config: WorkerConfig,
    provisioner: ProvisionerConfig,
    env: Mapping[str, str] | None = None,
) -> FastStream:
    service = ProvisionerService(config, provisioner, os.environ if env is None else env)
    return worker_app(WorkerKind.PROVISIONER, {Ping: answer_ping}, config, service)
