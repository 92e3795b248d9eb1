"""Accounts on the bus: one NATS user per role, each allowed only the subjects its part uses.

Without them any process that reaches NATS could publish a command with `actor_admin` set and
act as an admin. With them only a gateway may publish commands and cancels; a worker kind
consumes only its own commands and writes only its own buckets; an outside subscriber reads
the event log and nothing else.

Users and passwords, not NKeys: nats-py needs the separate `nkeys` package (and libsodium)
for NKeys, FastStream passes a user and password through as they are, and the passwords live
only in files of mode 0600 in the data folder (embedded) or in the deployment's secrets.

The permissions are data here, rendered into the embedded server's config at every start
and into `deploy/nats/permissions.conf` for the cluster (a test keeps the two equal).
"""

from __future__ import annotations

import enum
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

import msgspec

from bus.connection import NatsCredentials, inbox_prefix
from gpuproxy.natsd import write_private
from schemas import subjects, topology
from schemas.errors import ConfigError
from schemas.subjects import WorkerKind


class Role(enum.StrEnum):
    """Who connects. A worker kind's user is named after the kind."""

    GATEWAY = "gateway"
    PROVISIONER = "provisioner"
    PROXY = "proxy"
    BILLING = "billing"
    SUBSCRIBER = "subscriber"


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()


_API = "$JS.API"
_STREAMS = (topology.COMMAND_STREAM, topology.EVENT_STREAM)

WORKER_BUCKETS: Mapping[WorkerKind, tuple[str, ...]] = {
    WorkerKind.PROVISIONER: (
        topology.INSTANCES_BUCKET,
        topology.RESERVATIONS_BUCKET,
        topology.LEASES_BUCKET,
        topology.STATIC_CLAIMS_BUCKET,
    ),
    # Reads the registry to know where inference may go.
    WorkerKind.PROXY: (topology.INSTANCES_BUCKET, topology.BALANCING_BUCKET),
    WorkerKind.BILLING: (),
}
"""The buckets each worker kind reads and writes besides those of every worker."""
EVERY_WORKER_BUCKETS = (
    topology.RESULTS_BUCKET,
    topology.DRAINS_BUCKET,
    topology.WORKERS_BUCKET,
)
GATEWAY_BUCKETS = (
    topology.ACCESS_BUCKET,
    topology.ENDED_SESSIONS_BUCKET,
    topology.RATE_BUCKET,
    topology.KEYS_BUCKET,
    topology.RESULTS_BUCKET,
    topology.WORKERS_BUCKET,
)
"""What the gateway uses; it may reach every bucket, this list names the ones it needs."""


def _bucket(bucket: str) -> tuple[str, ...]:
    """Declare, read, write and watch one KV bucket (a stream named `KV_<bucket>`)."""
    stream = f"KV_{bucket}"
    return (
        f"$KV.{bucket}.>",
        f"{_API}.STREAM.INFO.{stream}",
        # Create only: an existing bucket's configuration stays as its first declarer made it.
        f"{_API}.STREAM.CREATE.{stream}",
        f"{_API}.STREAM.PURGE.{stream}",
        f"{_API}.STREAM.MSG.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}.>",
        # A watch is an ordered consumer on the bucket's stream.
        f"{_API}.CONSUMER.CREATE.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}.>",
        f"{_API}.CONSUMER.INFO.{stream}.>",
        f"{_API}.CONSUMER.DELETE.{stream}.>",
    )


def _worker(kind: WorkerKind) -> Permissions:
    cmd = topology.COMMAND_STREAM
    publish = [
        f"{subjects.EVENTS}.>",
        f"{subjects.REPLIES}.>",
        f"{_API}.INFO",
        f"{_API}.STREAM.NAMES",
        # Every process declares what it uses at start (`bus.topology`).
        *(
            f"{_API}.STREAM.{action}.{s}"
            for s in _STREAMS
            for action in ("INFO", "CREATE", "UPDATE")
        ),
        f"{_API}.CONSUMER.INFO.{cmd}.{kind}",
        f"{_API}.CONSUMER.DURABLE.CREATE.{cmd}.{kind}",
        # The create form that names its filter: only the kind's own commands.
        f"{_API}.CONSUMER.CREATE.{cmd}.{kind}.{subjects.commands_of(kind)}",
        f"{_API}.CONSUMER.MSG.NEXT.{cmd}.{kind}",
        f"$JS.ACK.{cmd}.{kind}.>",
        "$JS.FC.>",
    ]
    for bucket in (*EVERY_WORKER_BUCKETS, *WORKER_BUCKETS[kind]):
        publish.extend(_bucket(bucket))
    subscribe = [
        f"{inbox_prefix(str(kind))}.>",
        subjects.cancel(kind),
        subjects.credit(kind),
        f"$JS.EVENT.ADVISORY.CONSUMER.*.{cmd}.{kind}",
    ]
    if kind is WorkerKind.PROXY:
        # The replicas' shared load book (`workers.proxy.routing`).
        publish.append(subjects.LOAD)
        subscribe.append(subjects.LOAD)
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def _gateway() -> Permissions:
    # The front door publishes every command, so it is trusted with the JetStream API; the
    # one thing it may not do is erase the command queue or the audit trail.
    return Permissions(
        publish=(
            f"{subjects.COMMANDS}.>",
            f"{subjects.CONTROL}.>",
            f"{subjects.EVENTS}.>",
            f"{_API}.>",
            "$KV.>",
            "$JS.FC.>",
        ),
        publish_deny=tuple(
            f"{_API}.STREAM.{action}.{s}"
            for s in _STREAMS
            for action in ("DELETE", "PURGE", "MSG.DELETE")
        ),
        subscribe=(
            f"{inbox_prefix(str(Role.GATEWAY))}.>",
            f"{subjects.REPLIES}.>",
            f"{subjects.EVENTS}.>",
            "$JS.EVENT.>",
        ),
    )


def _subscriber() -> Permissions:
    # Live events by plain subscription, the past by reading the stream message by message.
    # No consumers: a push consumer's deliver subject is the creator's choice, and the server
    # would deliver events onto any subject it names, a worker's cancel subject included.
    return Permissions(
        publish=(
            f"{_API}.STREAM.INFO.{topology.EVENT_STREAM}",
            f"{_API}.STREAM.MSG.GET.{topology.EVENT_STREAM}",
        ),
        subscribe=(f"{subjects.EVENTS}.>", "_INBOX.>"),
    )


def permissions(role: Role) -> Permissions:
    if role is Role.GATEWAY:
        return _gateway()
    if role is Role.SUBSCRIBER:
        return _subscriber()
    return _worker(WorkerKind(str(role)))


def _variable(role: Role) -> str:
    return f"{role.upper()}_PERMISSIONS"


def _strings(values: tuple[str, ...], indent: str) -> str:
    inner = "".join(f"{indent}  {msgspec.json.encode(v).decode()}\n" for v in values)
    return f"[\n{inner}{indent}]"


def permission_variables() -> str:
    """nats-server config text defining `<ROLE>_PERMISSIONS` for every role."""
    blocks = [
        "# Written by `python -m gpuproxy.natsauth` from gpuproxy/natsauth.py: edit that and\n"
        "# write this again (a test compares them). One variable per role, used by the users\n"
        "# of the authorization block."
    ]
    for role in Role:
        rules = permissions(role)
        deny = f"\n    deny: {_strings(rules.publish_deny, '    ')}" if rules.publish_deny else ""
        blocks.append(
            f"{_variable(role)} = {{\n"
            f"  publish: {{\n    allow: {_strings(rules.publish, '    ')}{deny}\n  }}\n"
            f"  subscribe: {{\n    allow: {_strings(rules.subscribe, '    ')}\n  }}\n"
            "}"
        )
    return "\n\n".join(blocks) + "\n"


def authorization(passwords: Mapping[Role, str]) -> str:
    """The permission variables and an authorization block with each role's password."""
    users = "\n".join(
        f"    {{user: {msgspec.json.encode(str(role)).decode()}, "
        f"password: {msgspec.json.encode(password).decode()}, "
        f"permissions: ${_variable(role)}}}"
        for role, password in passwords.items()
    )
    return f"{permission_variables()}\nauthorization {{\n  users = [\n{users}\n  ]\n}}\n"


class EmbeddedAccounts:
    """The embedded server's users: a password per role, generated once into
    `<data>/nats/<role>.password` (mode 0600) and reused at every start."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def password_file(self, role: Role) -> Path:
        return self.folder / f"{role}.password"

    def ensure(self) -> dict[Role, str]:
        """Each role's password, made on first use."""
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.folder.chmod(0o700)
            passwords = {}
            for role in Role:
                path = self.password_file(role)
                if not path.exists():
                    write_private(path, secrets.token_urlsafe(32) + "\n")
                # A copy restored from a backup may have lost its mode.
                path.chmod(0o600)
                passwords[role] = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot keep the NATS credentials in {self.folder}: {exc.strerror}",
                field="GPUPROXY_DATA_DIR",
            ) from None
        for role, password in passwords.items():
            if not password:
                raise ConfigError(
                    f"{self.password_file(role)} is empty; delete it to have a new one made",
                    field="GPUPROXY_DATA_DIR",
                )
        return passwords

    def credentials(self, role: Role) -> NatsCredentials:
        return NatsCredentials(str(role), self.ensure()[role])

    def child_env(self, role: Role) -> dict[str, str]:
        """What a child process of `up` is given: its user and where its password is."""
        return {
            "NATS_USER": str(role),
            "NATS_PASSWORD_FILE": str(self.password_file(role)),
            "NATS_PASSWORD": "",
        }


if __name__ == "__main__":
    sys.stdout.write(permission_variables())
