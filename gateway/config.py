"""A gateway process's settings, filled in by the command line."""

from __future__ import annotations

import msgspec

from bus.connection import RECONNECT_BUFFER_BYTES, NatsCredentials
from gateway.auth.tokens import KeyRing


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    nats_credentials: NatsCredentials | None = None
    """The gateway's NATS user; None: a server without authentication (or the URL's own)."""
    nats_reconnect_buffer: int = RECONNECT_BUFFER_BYTES
    database_url: str
    gateway_id: str
    keys: KeyRing
    """Signs and checks access tokens (see `gpuproxy.signing`)."""
    bind: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 9090
    request_timeout: float = 30.0
    """Seconds a command may take when the client sets no deadline of its own."""
    inference_timeout: float = 600.0
    """Seconds an inference request (a whole stream included) may take."""
    probe_timeout: float = 2.0
    """Seconds each health check (database, streams, worker status) may take."""
    stream_replicas: int = 1
    log_level: str = "info"
    access_ttl: int = 900
    """Seconds an access token lives; a refresh token gets the next one."""
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs of reverse proxies whose `X-Forwarded-For` names the client."""
    auth_attempts_per_minute: int = 60
    """Sign-ins, registrations and refreshes per client address per minute, and failed
    credentials per client address per minute (counted apart); 0: no limit."""
    max_body_bytes: int = 16 * 1024 * 1024
    """The largest HTTP request body or gRPC request message either front door reads."""
    resync_access: bool = True
    """Bring the access bucket up to SQL at start (repairs a write cut short by a crash)."""
