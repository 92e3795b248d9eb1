"""A gateway process's settings, filled in by the command line."""

from __future__ import annotations

import msgspec

from gateway.auth.tokens import KeyRing


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    database_url: str
    gateway_id: str
    keys: KeyRing
    """Signs and checks access tokens (see `gpuproxy.signing`)."""
    bind: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 9090
    request_timeout: float = 30.0
    """Seconds a command may take when the client sets no deadline of its own."""
    probe_timeout: float = 2.0
    """Seconds readiness waits for each worker kind to answer its ping."""
    stream_replicas: int = 1
    log_level: str = "info"
    access_ttl: int = 900
    """Seconds an access token lives; a refresh token gets the next one."""
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs of reverse proxies whose `X-Forwarded-For` names the client."""
    auth_attempts_per_minute: int = 60
    """Sign-ins, registrations and refreshes per client address per minute; 0: no limit."""
    resync_access: bool = True
    """Bring the access bucket up to SQL at start (repairs a write cut short by a crash)."""
