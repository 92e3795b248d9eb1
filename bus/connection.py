"""Connecting to NATS: reconnect forever, log state changes without credentials."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client

from schemas.errors import Unavailable

log = logging.getLogger("gpuproxy.bus")


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


async def connect(urls: str, *, name: str, connect_timeout: float = 5.0) -> Client:
    """Connect, then keep reconnecting for as long as the process lives.

    The first connection must succeed within `connect_timeout`: a process that cannot reach
    its bus at start is misconfigured, and says so instead of waiting silently.
    """
    servers = split_servers(urls)
    shown = ", ".join(redact(s) for s in servers)

    connected = False

    async def on_error(exc: Exception) -> None:
        # Before the first connection every refused attempt lands here; the caller gets one
        # clear error instead. nats-py's errors never carry the URL's credentials.
        if connected:
            log.warning("nats: %s: %s", type(exc).__name__, exc)

    async def on_disconnect() -> None:
        # nats-py also reports its own close() as a disconnect; only a lost link is news.
        if connected and not client.is_closed and not client.is_draining:
            log.warning("nats: disconnected from %s", shown)

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    try:
        client = await asyncio.wait_for(
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
                pending_size=64 * 1024 * 1024,
            ),
            # With unlimited reconnects nats-py would retry the first connect forever.
            timeout=connect_timeout,
        )
    except Exception as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        raise Unavailable(f"cannot reach NATS at {shown}: {reason}") from None
    connected = True
    return client
