"""Connecting to NATS: reconnect forever, log state changes without credentials."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import nats
from nats.aio.client import Client
from nats.errors import AuthorizationError

from bus.tasks import cancel_and_wait
from schemas.errors import Unavailable

log = logging.getLogger("gpuproxy.bus")

RECONNECT_BUFFER_BYTES = 64 * 1024 * 1024
"""What a connection keeps of its outgoing messages while it reconnects, by default."""


class NatsCredentials(msgspec.Struct, frozen=True):
    """A NATS user and password. Shown without the password, so a config can be logged."""

    user: str
    password: str

    def __repr__(self) -> str:
        return f"NatsCredentials(user={self.user!r}, password=***)"


class NatsRefused(Unavailable):
    """The server refused the connection's credentials: a setting to fix, not an outage."""


def inbox_prefix(role: str) -> str:
    """Where a process's request replies arrive: one prefix per role, so a server with
    permissions lets each role read only its own replies (`_INBOX.>` is left to outside
    clients, which use the default)."""
    return f"_INBOX_{role}"


def redact(url: str) -> str:
    """A NATS URL with any user, password or token removed, safe for logs and errors."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def split_servers(urls: str) -> list[str]:
    return [u.strip() for u in urls.split(",") if u.strip()]


def credential_options(credentials: NatsCredentials | None) -> dict[str, Any]:
    """nats-py's connect arguments for `credentials`; none leaves the URL's own, if any."""
    if credentials is None:
        return {}
    return {"user": credentials.user, "password": credentials.password}


async def connect(
    urls: str,
    *,
    name: str,
    credentials: NatsCredentials | None = None,
    inbox: str | None = None,
    reconnect_buffer: int = RECONNECT_BUFFER_BYTES,
    connect_timeout: float = 5.0,
) -> Client:
    """Connect, then keep reconnecting for as long as the process lives.

    The first connection must succeed within `connect_timeout`: a process that cannot reach
    its bus at start is misconfigured, and says so instead of waiting silently. `inbox` is
    the role whose reply prefix the connection uses (see `inbox_prefix`).
    """
    servers = split_servers(urls)
    shown = ", ".join(redact(s) for s in servers)

    connected = False
    refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        # Before the first connection every refused attempt lands here; the caller gets one
        # clear error instead. nats-py's errors never carry the URL's credentials. A
        # permissions violation once connected is a subject this role may not use: logged.
        if connected:
            log.warning("nats: %s: %s", type(exc).__name__, exc)
        elif not refused.done() and (
            isinstance(exc, AuthorizationError) or "authorization" in str(exc).lower()
        ):
            refused.set_result(None)

    async def on_disconnect() -> None:
        # nats-py also reports its own close() as a disconnect; only a lost link is news.
        if connected and not attempt.result().is_closed and not attempt.result().is_draining:
            log.warning("nats: disconnected from %s", shown)

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    attempt = asyncio.ensure_future(
        nats.connect(
            servers=servers,
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            # Kept while reconnecting; at least one largest message must fit.
            pending_size=reconnect_buffer,
            inbox_prefix=inbox_prefix(inbox) if inbox else "_INBOX",
            **credential_options(credentials),
        )
    )
    # With unlimited reconnects nats-py would retry the first connect forever; refused
    # credentials will not be accepted on a later try either, so they end the wait at once.
    either: list[asyncio.Future[Any]] = [attempt, refused]
    await asyncio.wait(either, timeout=connect_timeout, return_when=asyncio.FIRST_COMPLETED)
    if not attempt.done():
        await cancel_and_wait([attempt])
        if not attempt.cancelled():
            attempt.exception()  # retrieved: the refusal below says what went wrong
        if refused.done():
            user = f"user {credentials.user!r}" if credentials else "no credentials"
            raise NatsRefused(f"NATS at {shown} refused {user}: authorization violation") from None
        raise Unavailable(f"cannot reach NATS at {shown}: timed out") from None
    failure = attempt.exception()
    if failure is not None:
        raise Unavailable(f"cannot reach NATS at {shown}: {type(failure).__name__}") from None
    connected = True
    return attempt.result()
