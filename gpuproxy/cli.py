"""The `gpuproxy` command: start the system or one of its parts.

Every error a user can cause (a bad setting, an unreachable NATS, a taken port) ends in one
line naming the setting and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

import click

from bus.tasks import cancel_and_wait
from gpuproxy import settings as settings_module
from gpuproxy import signing
from gpuproxy.settings import Settings
from gpuproxy.supervisor import PARENT_PID
from schemas.errors import ConfigError, GpuproxyError
from schemas.subjects import WorkerKind

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gpuproxy.natsauth import EmbeddedAccounts
    from gpuproxy.natsd import NatsServer
    from workers.common.config import WorkerConfig
    from workers.provisioner.config import ProvisionerConfig

EXIT_CONFIG = 2


def _fail(error: GpuproxyError) -> NoReturn:
    where = f"{error.field}: " if error.field else ""
    click.echo(f"gpuproxy: {where}{error.message}", err=True)
    sys.exit(EXIT_CONFIG)


def _settings() -> Settings:
    try:
        return settings_module.load()
    except ConfigError as exc:
        _fail(exc)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop where it exists (faster sockets), plain asyncio elsewhere."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _check_nats(url: str, settings: Settings) -> None:
    from bus.connection import NatsRefused, connect

    try:
        nc = await connect(
            url,
            name="gpuproxy-check",
            credentials=settings.nats_credentials,
            connect_timeout=5.0,
        )
    except NatsRefused as exc:
        field = "NATS_PASSWORD" if settings.nats_credentials else "NATS_USER"
        raise ConfigError(exc.message, field=field) from None
    except GpuproxyError as exc:
        raise ConfigError(exc.message, field="NATS_URL") from None
    await nc.close()


def _require_nats(settings: Settings) -> str:
    if settings.nats_url is None:
        raise ConfigError(
            "is not set; `gpuproxy up` starts an embedded server, the parts alone need one",
            field="NATS_URL",
        )
    return settings.nats_url


async def _watch_parent(stop: Callable[[], None]) -> None:
    """Stop when the supervisor that started us is gone (killed outright, no signal sent)."""
    parent = os.environ.get(PARENT_PID)
    if not parent:
        return
    # No event tells a process its parent died; polling once a second is cheap.
    while os.getppid() == int(parent):  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    stop()


@click.group()
@click.version_option(package_name="gpuproxy")
def main() -> None:
    """gpuproxy: rent GPUs, route inference to them, keep spend under hard limits."""


@main.command()
def up() -> None:
    """Start everything on embedded defaults: nats-server, migrations, gateway, workers."""
    from gpuproxy import first_admin, migrate
    from gpuproxy.natsauth import Role
    from gpuproxy.supervisor import say, supervise

    settings = _settings()
    _logging(settings.log_level)
    server: NatsServer | None = None
    accounts: EmbeddedAccounts | None = None
    try:
        settings_module.ensure_data_dir(settings.data_dir)
        # Checked (and on first run made) here, so a bad secret stops `up` before anything runs.
        signing.key_ring(os.environ, settings.data_dir, create=True)
        signing.upstream_secret(os.environ, settings.data_dir, create=True)
        settings_module.ensure_port_free(settings.bind, settings.http_port, "SERVER_PORT")
        settings_module.ensure_port_free(settings.bind, settings.grpc_port, "GRPC_PORT")
        if settings.nats_url is None:
            server, accounts = _embedded_nats(settings)
            nats_url = server.start()
        else:
            nats_url = settings.nats_url
            _run(_check_nats(nats_url, settings))
        migrate.upgrade(settings.database_url)
        first = first_admin.ensure(settings.database_url, os.environ)
    except GpuproxyError as exc:
        if server is not None:
            server.stop()
        _fail(exc)
    if first is not None:
        say("supervisor", f"first admin created: {first[0]} with password {first[1]}")
        say("supervisor", "this password is shown once; keep it or set GPUPROXY_ADMIN_PASSWORD")
    say("supervisor", f"data in {settings.data_dir}; NATS at {nats_url}")
    if accounts is not None:
        say(
            "supervisor",
            f"outside subscribers of gpuproxy.evt.> connect to {nats_url} as user "
            f"{Role.SUBSCRIBER} with the password in {accounts.password_file(Role.SUBSCRIBER)}",
        )
    say(
        "supervisor",
        f"HTTP on http://{settings.bind}:{settings.http_port}, "
        f"gRPC on {settings.bind}:{settings.grpc_port}; Ctrl-C stops everything",
    )
    env = {**os.environ, "NATS_URL": nats_url, "DATABASE_URL": settings.database_url}
    # Each child connects as its own role; with an outside NATS all share the given user.
    own = {} if accounts is None else {str(r): accounts.child_env(r) for r in Role}
    try:
        code = asyncio.run(supervise(env, drain_timeout=settings.drain_timeout, env_of=own))
    finally:
        if server is not None:
            server.stop()
            say("supervisor", "nats-server stopped")
    sys.exit(code)


def _embedded_nats(settings: Settings) -> tuple[NatsServer, EmbeddedAccounts]:
    """The local nats-server of `up`: a user per role, messages as large as a request."""
    from gpuproxy import natsauth
    from gpuproxy.natsd import NatsServer, payload_limit
    from gpuproxy.supervisor import say

    folder = settings.data_dir / "nats"
    accounts = natsauth.EmbeddedAccounts(folder)
    server = NatsServer(
        settings.data_dir / "jetstream",
        port=settings.nats_port,
        log_line=lambda line: say("nats", line),
        authorization=natsauth.authorization(accounts.ensure()),
        max_payload=payload_limit(settings.max_body_bytes),
        config_file=folder / "nats-server.conf",
    )
    return server, accounts


@main.command()
def gateway() -> None:
    """Run one gateway: gRPC and HTTP front doors."""
    from gateway.config import GatewayConfig

    settings = _settings()
    _logging(settings.log_level)
    try:
        config = GatewayConfig(
            nats_url=_require_nats(settings),
            nats_credentials=settings.nats_credentials,
            nats_reconnect_buffer=settings.nats_reconnect_buffer,
            database_url=settings.database_url,
            gateway_id=settings_module.process_id("gateway"),
            keys=signing.key_ring(os.environ, settings.data_dir, create=False),
            bind=settings.bind,
            http_port=settings.http_port,
            grpc_port=settings.grpc_port,
            request_timeout=settings.request_timeout,
            inference_timeout=settings.inference_timeout,
            stream_replicas=settings.stream_replicas,
            log_level=settings.log_level,
            trusted_proxies=settings.trusted_proxies,
            auth_attempts_per_minute=settings.auth_attempts_per_minute,
            max_body_bytes=settings.max_body_bytes,
        )
        _run(_gateway_main(config))
    except GpuproxyError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(ConfigError(f"cannot listen: {exc.strerror or exc}", field="SERVER_PORT/GRPC_PORT"))


async def _gateway_main(config: GatewayConfig) -> None:
    from gateway.server import serve

    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_parent(stop.set))
    try:
        await serve(config, stop)
    finally:
        await cancel_and_wait([watcher])


@main.command()
@click.argument("kind", type=click.Choice([k.value for k in WorkerKind]))
def worker(kind: str) -> None:
    """Run one worker of KIND on its durable consumer; start more for more throughput."""
    from workers.common.config import WorkerConfig

    settings = _settings()
    _logging(settings.log_level)
    try:
        nats_url = _require_nats(settings)
        _run(_check_nats(nats_url, settings))
        config = WorkerConfig(
            nats_url=nats_url,
            nats_credentials=settings.nats_credentials,
            nats_reconnect_buffer=settings.nats_reconnect_buffer,
            worker_id=settings_module.process_id(kind),
            ack_wait=settings.proxy_ack_wait if kind == WorkerKind.PROXY else settings.ack_wait,
            max_deliver=settings.max_deliver,
            window=settings.worker_window,
            drain_timeout=settings.drain_timeout,
            stream_replicas=settings.stream_replicas,
        )
        _run(_worker_main(WorkerKind(kind), config, settings))
    except GpuproxyError as exc:
        _fail(exc)


def _provisioner_config(settings: Settings) -> ProvisionerConfig:
    from workers.provisioner.config import ProvisionerConfig

    # Sim machines end with the supervisor of `gpuproxy up` unless told otherwise.
    owner = settings.sim_owner_pid or int(os.environ.get(PARENT_PID, "0") or 0)
    return ProvisionerConfig(
        sim_dir=settings.sim_dir or settings.data_dir / "sim",
        sim_owner_pid=owner,
        providers=settings.providers,
        placement=settings.placement,
        pending_seconds=settings.pending_timeout,
        provisioning_seconds=settings.provisioning_timeout,
        start_seconds=settings.start_timeout,
        stop_seconds=settings.stop_timeout,
        reconcile_seconds=settings.reconcile_interval,
        meter_seconds=settings.meter_interval,
        lease_seconds=settings.lease_ttl,
        upstream_secret=signing.upstream_secret(os.environ, settings.data_dir, create=False),
    )


async def _worker_main(kind: WorkerKind, config: WorkerConfig, settings: Settings) -> None:
    from workers.billing.app import build as billing
    from workers.common.static_endpoints import load_endpoints
    from workers.provisioner.app import build as provisioner
    from workers.proxy.app import build as proxy
    from workers.proxy.config import ProxyConfig
    from workers.proxy.model_routes import ENV_VAR as MODEL_ROUTES
    from workers.proxy.model_routes import parse_model_routes

    if kind is WorkerKind.PROVISIONER:
        app = provisioner(config, _provisioner_config(settings))
    elif kind is WorkerKind.PROXY:
        proxy_config = ProxyConfig(
            prices=settings.prices,
            upstream_allow=settings.upstream_allow,
            request_timeout=settings.inference_timeout,
            strategy=settings.lb_strategy,
            static_endpoints=tuple(load_endpoints(os.environ)),
            model_routes=parse_model_routes(os.environ.get(MODEL_ROUTES, "")),
            upstream_secret=signing.upstream_secret(os.environ, settings.data_dir, create=False),
        )
        app = proxy(config, proxy_config)
    else:
        app = billing(config)
    watcher = asyncio.create_task(_watch_parent(app.exit))
    try:
        await app.run(log_level=logging.DEBUG)
    finally:
        await cancel_and_wait([watcher])


@main.command("migrate")
def migrate_command() -> None:
    """Apply the SQL migrations to DATABASE_URL (or the embedded SQLite file)."""
    from gpuproxy import migrate

    settings = _settings()
    _logging(settings.log_level)
    try:
        if settings.database_url.startswith("sqlite"):
            settings_module.ensure_data_dir(settings.data_dir)
        migrate.upgrade(settings.database_url)
    except GpuproxyError as exc:
        _fail(exc)
    click.echo(f"database at revision {migrate.head()}")


@main.command()
@click.option(
    "--target", default=None, help="gateway gRPC address (default: GRPC_PORT on localhost)"
)
@click.option("--kind", "worker_kind", default="provisioner", show_default=True)
@click.option("--message", default="hello", show_default=True)
@click.option(
    "--api-key",
    envvar="GPUPROXY_API_KEY",
    default=None,
    help="an API key (or set GPUPROXY_API_KEY); ping needs a credential",
)
def ping(target: str | None, worker_kind: str, message: str, api_key: str | None) -> None:
    """Send a ping through the gateway, JetStream and a worker, and print who answered."""
    import grpc

    from gateway.pb import gpuproxy_pb2 as pb
    from gateway.pb import gpuproxy_pb2_grpc as pb_grpc

    settings = _settings()
    address = target or f"127.0.0.1:{settings.grpc_port}"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GPUProxyServiceStub(channel)
        try:
            reply = stub.Ping(
                pb.PingRequest(message=message, worker_kind=worker_kind),
                timeout=10,
                metadata=(("x-api-key", api_key),) if api_key else None,
            )
        except grpc.RpcError as exc:
            click.echo(f"gpuproxy: ping failed: {exc.code().name}: {exc.details()}", err=True)
            sys.exit(1)
    click.echo(
        f"{reply.message!r} answered by {reply.worker_kind} {reply.worker_id} "
        f"(delivery {reply.attempt})"
    )


@main.command("sim-upstream")
@click.option("--port", type=click.IntRange(1, 65535), required=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--model", default=None, help="the model it serves [default: sim-llama-3-8b]")
@click.option("--ttft-ms", type=click.IntRange(min=0), default=None, help="delay before token 1")
@click.option(
    "--token-delay-ms", type=click.IntRange(min=0), default=None, help="delay between tokens"
)
@click.option(
    "--fail",
    type=click.Choice(["refuse", "throttle", "slow", "cut", "die"]),
    default=None,
    help="fail inference requests this way",
)
@click.option(
    "--fail-rate",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="fraction of requests --fail hits, evenly spread [default: 1]",
)
@click.option("--slow-ms", type=click.IntRange(min=0), default=None, help="delay of --fail slow")
@click.option(
    "--fail-after", type=click.IntRange(min=0), default=None, help="tokens sent before cut/die"
)
@click.option(
    "--boot-delay-ms", type=click.IntRange(min=0), default=None, help="wait before listening"
)
@click.option("--boot-fail", is_flag=True, default=None, help="exit at once: a failed boot")
@click.option(
    "--owner-pid",
    type=click.IntRange(min=1),
    envvar="GPUPROXY_SIM_OWNER_PID",
    default=None,
    help="exit when this process has ended (or set GPUPROXY_SIM_OWNER_PID)",
)
@click.option(
    "--api-key",
    # VLLM_API_KEY as vLLM reads it: the provisioner starts every machine with its key there.
    envvar=["GPUPROXY_SIM_API_KEY", "VLLM_API_KEY"],
    default=None,
    help="ask /v1/* for this bearer key (or set GPUPROXY_SIM_API_KEY or VLLM_API_KEY, "
    "kept out of ps)",
)
@click.option(
    "--prefill-us-per-token",
    type=click.IntRange(min=0),
    default=None,
    help="prefill microseconds per prompt token not in the KV cache [default: 0]",
)
@click.option(
    "--cache-blocks",
    type=click.IntRange(min=0),
    default=None,
    help="KV-cache size in blocks, LRU [default: 0, no cache]",
)
@click.option(
    "--block-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="tokens per KV-cache block [default: 16]",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=0),
    default=None,
    help="requests generating at once, the rest wait in order [default: 0, no limit]",
)
def sim_upstream(**options: Any) -> None:
    """Serve an OpenAI-compatible API with deterministic tokens: a `sim` machine."""
    import msgspec

    from simulator.upstream import UpstreamOptions, serve

    given = {name: value for name, value in options.items() if value is not None}
    sys.exit(serve(msgspec.convert(given, UpstreamOptions)))
