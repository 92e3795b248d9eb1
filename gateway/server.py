"""One gateway process: the gRPC server and the HTTP app on one event loop.

Stop order on SIGTERM: report NOT_SERVING, stop taking new calls, let calls in flight finish
(up to the grace period), then leave the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bus.caller import CommandCaller
from bus.connection import connect
from bus.events import EventPublisher
from bus.tasks import cancel_and_wait
from bus.topology import declare_bucket
from gateway.accounts.ip_access import IpAccess
from gateway.accounts.keys import ApiKeys
from gateway.accounts.projection import Projection
from gateway.accounts.service import AccountService
from gateway.accounts.store import Accounts
from gateway.accounts.usage import UsageRecorder
from gateway.auth.addresses import parse_network
from gateway.auth.gatekeeper import Gatekeeper
from gateway.auth.grpc_guard import GuardInterceptor
from gateway.auth.http_guard import HttpGuard
from gateway.auth.policy import GRPC_METHODS
from gateway.auth.ratelimit import RateLimiter
from gateway.auth.tokens import TokenAuthority
from gateway.auth.view import AccessView
from gateway.config import GatewayConfig
from gateway.database import engine_for
from gateway.gpus.preferences import PreferenceStore
from gateway.gpus.service import GpuService
from gateway.grpc_service import GPUProxyService
from gateway.health import Health
from gateway.http_app import build_app
from gateway.http_io import BodyLimit
from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from gateway.unexpected import UnexpectedErrors
from schemas import topology

log = logging.getLogger("gpuproxy.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GPUProxyService"].full_name
GRACE_SECONDS = 10.0


async def _resync(projection: Projection) -> None:
    while True:
        try:
            repaired = await projection.resync()
        except Exception as exc:
            # The URL (and its password) stays out of the log: the type says enough.
            log.warning(
                "access bucket not checked against the database yet (%s)", type(exc).__name__
            )
            await asyncio.sleep(5)
            continue
        if repaired:
            log.info("access bucket: %d records brought up to the database", repaired)
        return


class _HttpServer(uvicorn.Server):
    # The gateway owns the signals: uvicorn's own handlers would stop HTTP alone.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    config: GatewayConfig,
    stop: asyncio.Event | None = None,
    *,
    ready: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM when `handle_signals`); `ready` is set
    once both front doors listen."""
    stop = stop or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    nc = await connect(
        config.nats_url,
        name=config.gateway_id,
        credentials=config.nats_credentials,
        inbox="gateway",
        reconnect_buffer=config.nats_reconnect_buffer,
    )
    caller = CommandCaller(nc, gateway_id=config.gateway_id, stream_replicas=config.stream_replicas)
    await caller.start()
    engine = engine_for(config.database_url)
    checks = Health(nc, engine, probe_timeout=config.probe_timeout)
    js = nc.jetstream()
    events = EventPublisher(js)
    authority = TokenAuthority(config.keys, ttl_seconds=config.access_ttl)
    projection = Projection(engine, js, replicas=config.stream_replicas)
    await projection.start()
    resync = asyncio.create_task(_resync(projection)) if config.resync_access else None
    if resync is not None:
        # Serve with the bucket current when the database answers; keep trying when not.
        await asyncio.wait([resync], timeout=config.probe_timeout * 5)
    view = AccessView(js, replicas=config.stream_replicas)
    await view.start()
    usage = UsageRecorder(engine)
    await usage.start()
    limiter = RateLimiter(await declare_bucket(js, topology.rate_bucket(config.stream_replicas)))
    gatekeeper = Gatekeeper(
        authority,
        view,
        limiter,
        usage,
        trusted_proxies=[
            parse_network(cidr, field="GPUPROXY_TRUSTED_PROXIES") for cidr in config.trusted_proxies
        ],
        attempts_per_minute=config.auth_attempts_per_minute,
    )
    accounts = AccountService(Accounts(engine), ApiKeys(engine), projection, authority, events)
    ip_access = IpAccess(engine, projection, events)
    preferences = PreferenceStore(engine)
    gpus = GpuService(caller, preferences, timeout=config.request_timeout)

    server = grpc.aio.server(
        # The first interceptor is the outermost: a failure in admission is covered too.
        interceptors=[UnexpectedErrors(), GuardInterceptor(gatekeeper, GRPC_METHODS)],
        options=[
            ("grpc.so_reuseport", 0),
            # The same bound as an HTTP body; grpc answers RESOURCE_EXHAUSTED past it.
            ("grpc.max_receive_message_length", config.max_body_bytes),
        ],
    )
    pb_grpc.add_GPUProxyServiceServicer_to_server(
        GPUProxyService(caller, checks, accounts, config, gpus), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    grpc_address = f"{config.bind}:{config.grpc_port}"
    if server.add_insecure_port(grpc_address) == 0:
        raise OSError(f"cannot listen for gRPC on {grpc_address}")
    await server.start()

    http = _HttpServer(
        uvicorn.Config(
            BodyLimit(
                build_app(
                    caller,
                    checks,
                    HttpGuard(gatekeeper),
                    accounts,
                    ip_access,
                    config,
                    gpus,
                    preferences,
                ),
                limit=config.max_body_bytes,
            ),
            host=config.bind,
            port=config.http_port,
            log_level=config.log_level.lower(),
            access_log=False,
            lifespan="off",
            # Forwarded headers count only from GPUPROXY_TRUSTED_PROXIES, read by the guard;
            # uvicorn's own rewriting would trust any local peer.
            proxy_headers=False,
            # A WebSocket frame is a request body too.
            ws_max_size=config.max_body_bytes,
        )
    )
    http_task = asyncio.create_task(http.serve(), name="http")
    # uvicorn has no "started" event to await; its flag flips once the socket listens.
    while not http.started and not http_task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if ready is not None:
        ready.set()
    log.info(
        "gateway %s serving gRPC on %s and HTTP on %s:%d",
        config.gateway_id,
        grpc_address,
        config.bind,
        config.http_port,
    )

    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([stopped, http_task], return_when=asyncio.FIRST_COMPLETED)
    if http_task.done() and not stopped.done():
        stopped.cancel()
        http_task.result()  # surfaces why HTTP could not serve (port taken, ...)
    log.info("gateway %s stopping: draining calls in flight", config.gateway_id)
    await health_servicer.enter_graceful_shutdown()
    http.should_exit = True
    await asyncio.gather(server.stop(GRACE_SECONDS), http_task, return_exceptions=True)
    if resync is not None:
        await cancel_and_wait([resync])
    await checks.stop()
    await caller.stop()
    await usage.stop()
    await view.stop()
    await nc.drain()
    await engine.dispose()
    log.info("gateway %s stopped", config.gateway_id)
