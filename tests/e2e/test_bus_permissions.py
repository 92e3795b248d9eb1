"""The bus is a trust boundary: each role's NATS user may use only the subjects of its part.

Every test runs a real nats-server with the users and permissions `gpuproxy up` writes, and
connects with each role's credentials as that role's processes do.
"""

from __future__ import annotations

import asyncio
import re
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig

from bus.caller import CommandCaller
from bus.codec import encode
from bus.connection import NatsCredentials, NatsRefused, connect, inbox_prefix
from bus.events import EventPublisher
from bus.topology import declare_stream
from gpuproxy import natsauth
from gpuproxy.natsauth import EmbeddedAccounts, Role
from gpuproxy.natsd import NatsServer, payload_limit
from schemas import subjects, topology
from schemas.commands import Ping
from schemas.events import Event, WorkerStarted
from schemas.replies import Pong
from schemas.subjects import WorkerKind
from tests.conftest import free_port
from tests.e2e.processes import gpuproxy, gpuproxy_env, wait_serving
from workers.common.config import WorkerConfig
from workers.proxy.app import build as proxy

ADMIN_COMMAND = subjects.command(WorkerKind.PROVISIONER, "ping")


class Bus(msgspec.Struct, frozen=True):
    url: str
    accounts: EmbeddedAccounts


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    accounts = EmbeddedAccounts(tmp_path / "nats")
    log = (tmp_path / "nats-server.log").open("w")
    server = NatsServer(
        tmp_path / "jetstream",
        log_line=lambda line: print(line, file=log, flush=True),
        authorization=natsauth.authorization(accounts.ensure()),
        max_payload=payload_limit(16 * 1024 * 1024),
        config_file=tmp_path / "nats" / "nats-server.conf",
    )
    try:
        yield Bus(server.start(), accounts)
    finally:
        server.stop()
        log.close()


class Connection(msgspec.Struct):
    client: Client
    errors: list[str]


@asynccontextmanager
async def connected(bus: Bus, role: Role, *, inbox: str | None = None) -> AsyncIterator[Connection]:
    """A plain nats-py connection as `role`, keeping what the server reports as errors."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    credentials = bus.accounts.credentials(role)
    client = await nats.connect(
        bus.url,
        user=credentials.user,
        password=credentials.password,
        error_cb=on_error,
        inbox_prefix=inbox or "_INBOX",
        allow_reconnect=False,
    )
    try:
        yield Connection(client, errors)
    finally:
        await client.close()


async def declared(bus: Bus) -> Client:
    """The gateway's connection, with the command and event streams in place."""
    nc = await connect(
        bus.url, name="gw", credentials=bus.accounts.credentials(Role.GATEWAY), inbox="gateway"
    )
    js = nc.jetstream()
    await declare_stream(js, topology.command_stream())
    await declare_stream(js, topology.event_stream())
    return nc


async def commands_stored(nc: Client) -> int:
    info = await nc.jetstream().stream_info(topology.COMMAND_STREAM)
    return info.state.messages


async def refused(connection: Connection, subject: str) -> bool:
    """Publish to `subject`, wait for the server's verdict; True when it was a violation."""
    await connection.client.publish(subject, encode(Ping(command_id=uuid.uuid4().hex)))
    await connection.client.flush()
    for _ in range(50):
        # nats-py reports the server's error in lower case.
        if any(f'violation for publish to "{subject.lower()}"' in e for e in connection.errors):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_the_subscriber_cannot_publish_a_command(bus: Bus) -> None:
    gateway = await declared(bus)
    async with connected(bus, Role.SUBSCRIBER) as subscriber:
        was_refused = await refused(subscriber, ADMIN_COMMAND)
        stored = await commands_stored(gateway)
    await gateway.close()

    assert was_refused
    assert stored == 0


async def test_the_subscriber_reads_events_live_and_from_the_log(bus: Bus) -> None:
    gateway = await declared(bus)
    started = WorkerStarted(
        event_id="started-w1",
        occurred_at_ms=1,
        worker_id="w1",
        worker_kind="proxy",
        host="h",
        pid=1,
    )
    async with connected(bus, Role.SUBSCRIBER) as subscriber:
        live = await subscriber.client.subscribe(f"{subjects.EVENTS}.>")
        await subscriber.client.flush()
        # Generous: the first publish on a busy machine also sets up the reply inbox.
        await EventPublisher(gateway.jetstream(timeout=20)).publish(started)
        heard = await live.next_msg(timeout=5)
        logged = await subscriber.client.jetstream().get_msg(topology.EVENT_STREAM, seq=1)
        errors = subscriber.errors
    await gateway.close()

    assert msgspec.json.decode(heard.data, type=Event) == started
    assert logged.data is not None
    assert msgspec.json.decode(logged.data, type=Event) == started
    assert not any("violation" in e for e in errors)


async def test_the_subscriber_cannot_make_the_server_deliver_events_elsewhere(bus: Bus) -> None:
    # A push consumer delivers to any subject its creator names, a worker's cancel subject
    # included: the read-only role creates no consumers at all.
    gateway = await declared(bus)
    async with connected(bus, Role.SUBSCRIBER) as subscriber:
        with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
            await subscriber.client.jetstream(timeout=1).add_consumer(
                topology.EVENT_STREAM,
                ConsumerConfig(deliver_subject=subjects.cancel(WorkerKind.PROVISIONER)),
            )
        errors = subscriber.errors
    consumers = (await gateway.jetstream().stream_info(topology.EVENT_STREAM)).state.consumer_count
    await gateway.close()

    assert any("permissions violation" in e for e in errors)
    assert consumers == 0


@pytest.mark.parametrize("kind", list(WorkerKind))
async def test_a_worker_cannot_publish_a_command_or_a_cancel(bus: Bus, kind: WorkerKind) -> None:
    gateway = await declared(bus)
    async with connected(bus, Role(str(kind)), inbox=inbox_prefix(str(kind))) as worker:
        command_refused = await refused(worker, subjects.command(kind, "ping"))
        cancel_refused = await refused(worker, subjects.cancel(WorkerKind.BILLING))
        stored = await commands_stored(gateway)
    await gateway.close()

    assert command_refused
    assert cancel_refused
    assert stored == 0


async def test_a_worker_cannot_take_another_kinds_commands(bus: Bus) -> None:
    gateway = await declared(bus)
    async with connected(bus, Role.PROXY, inbox=inbox_prefix("proxy")) as worker:
        next_of_billing = f"$JS.API.CONSUMER.MSG.NEXT.{topology.COMMAND_STREAM}.billing"
        was_refused = await refused(worker, next_of_billing)
    await gateway.close()

    assert was_refused


async def test_the_gateway_publishes_a_command_and_a_worker_answers_it(bus: Bus) -> None:
    gateway = await declared(bus)
    stored_before = await commands_stored(gateway)
    config = WorkerConfig(
        nats_url=bus.url,
        nats_credentials=bus.accounts.credentials(Role.PROXY),
        worker_id=f"proxy-{uuid.uuid4().hex[:6]}",
    )
    app = proxy(config)
    await app.start()
    caller = CommandCaller(gateway, gateway_id="gw-1")
    try:
        await caller.start()
        reply = await caller.call(
            WorkerKind.PROXY, Ping(command_id=uuid.uuid4().hex, message="hi"), timeout=10
        )
    finally:
        await caller.stop()
        await app.stop()
        await gateway.close()

    assert stored_before == 0
    assert isinstance(reply, Pong)
    assert (reply.message, reply.worker_kind) == ("hi", "proxy")


async def test_a_wrong_password_is_refused_naming_the_user(bus: Bus) -> None:
    with pytest.raises(NatsRefused) as refusal:
        await connect(bus.url, name="x", credentials=NatsCredentials("gateway", "not-it"))

    assert "'gateway'" in refusal.value.message
    assert "not-it" not in refusal.value.message


async def test_without_credentials_nothing_connects(bus: Bus) -> None:
    with pytest.raises(NatsRefused):
        await connect(bus.url, name="anonymous")


def test_credentials_are_made_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    first = EmbeddedAccounts(tmp_path / "nats").ensure()
    again = EmbeddedAccounts(tmp_path / "nats").ensure()

    assert first == again
    assert set(first) == set(Role)
    assert len(set(first.values())) == len(Role), "each role has its own password"
    assert stat.S_IMODE((tmp_path / "nats").stat().st_mode) == 0o700
    for role in Role:
        assert stat.S_IMODE((tmp_path / "nats" / f"{role}.password").stat().st_mode) == 0o600


def test_the_server_config_with_the_passwords_is_private(bus: Bus, tmp_path: Path) -> None:
    config = tmp_path / "nats" / "nats-server.conf"

    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert f"max_payload: {payload_limit(16 * 1024 * 1024)}" in config.read_text()


SUBSCRIBER_LINE = re.compile(
    r"connect to (?P<url>nats://\S+) as user subscriber with the password in (?P<file>\S+)"
)


@pytest.mark.slow
def test_up_prints_how_a_subscriber_connects_and_keeps_its_credentials(tmp_path: Path) -> None:
    grpc_port = free_port()
    env = gpuproxy_env(tmp_path, SERVER_PORT=str(free_port()), GRPC_PORT=str(grpc_port))
    target = f"127.0.0.1:{grpc_port}"
    runs = []
    for run in range(2):
        log = tmp_path / f"up-{run}.log"
        with gpuproxy(["up"], env, log) as up:
            wait_serving(target, up, log)
            printed = SUBSCRIBER_LINE.search(log.read_text())
            assert printed, log.read_text()
            password_file = Path(printed["file"])
            password = password_file.read_text().strip()
            heard = asyncio.run(_first_logged_event(printed["url"], password))
        runs.append((password_file, password, heard, log.read_text()))

    (file, password, heard, log_text), (_, password_again, _, _) = runs
    assert file.parent == tmp_path / "data" / "nats"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert password_again == password, "the credentials are reused, not made anew"
    assert password not in log_text, "the log names the file, never the password"
    assert heard is not None
    assert "Violation" not in log_text, "no process of `up` used a subject it may not"


async def _first_logged_event(url: str, password: str) -> Event | None:
    nc = await nats.connect(url, user="subscriber", password=password, allow_reconnect=False)
    try:
        for _ in range(50):
            try:
                msg = await nc.jetstream().get_msg(topology.EVENT_STREAM, seq=1)
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.1)
                continue
            assert msg.data is not None
            return msgspec.json.decode(msg.data, type=Event)
        return None
    finally:
        await nc.close()


def test_every_bucket_is_given_to_the_roles_that_use_it() -> None:
    # A new bucket must be placed: a worker kind that uses one it was not given is refused.
    declared = {value for name, value in vars(topology).items() if name.endswith("_BUCKET")}
    given = {
        *natsauth.GATEWAY_BUCKETS,
        *natsauth.EVERY_WORKER_BUCKETS,
        *(bucket for buckets in natsauth.WORKER_BUCKETS.values() for bucket in buckets),
    }

    assert declared - given == set()
