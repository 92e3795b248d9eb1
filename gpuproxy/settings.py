"""Settings from the environment, checked once, each error naming its variable."""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path

import msgspec

from bus.connection import RECONNECT_BUFFER_BYTES, NatsCredentials
from gpuproxy.natsd import payload_limit
from schemas.balancing import Strategy
from schemas.errors import ConfigError
from schemas.gpus import PLACEMENT_STRATEGIES, PROVIDER_ALIASES, ProviderName
from schemas.prices import DEFAULT_PRICES, PRICES_SETTING, PriceTable, parse_prices


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: Path
    nats_url: str | None
    """None: `gpuproxy up` starts its own nats-server."""
    database_url: str
    bind: str
    http_port: int
    grpc_port: int
    nats_port: int
    log_level: str
    stream_replicas: int
    ack_wait: float
    max_deliver: int
    worker_window: int
    drain_timeout: float
    request_timeout: float
    trusted_proxies: tuple[str, ...] = ()
    auth_attempts_per_minute: int = 60
    max_body_bytes: int = 16 * 1024 * 1024
    """The largest request either front door reads (HTTP body, gRPC message)."""
    providers: tuple[str, ...] = ()
    sim_dir: Path | None = None
    sim_owner_pid: int = 0
    placement: str = "cheapest"
    pending_timeout: float = 60.0
    provisioning_timeout: float = 300.0
    start_timeout: float = 900.0
    stop_timeout: float = 300.0
    reconcile_interval: float = 10.0
    meter_interval: float = 5.0
    lease_ttl: float = 10.0
    prices: PriceTable = DEFAULT_PRICES
    """Per-model token prices (`GPUPROXY_PRICES`) over the defaults for the `sim` models."""
    upstream_allow: str = ""
    """`GPUPROXY_UPSTREAM_ALLOW`: private networks inference may still be sent to."""
    inference_timeout: float = 600.0
    proxy_ack_wait: float = 5.0
    """The proxy kind's ack wait: a request whose worker died before its first token goes to
    another replica after this, not after the long `ack_wait` provisioning needs."""
    lb_strategy: Strategy = Strategy.ROUND_ROBIN
    """`LB_STRATEGY`: how the proxy picks a machine unless an account chose otherwise."""
    nats_credentials: NatsCredentials | None = None
    """NATS_USER with NATS_PASSWORD or NATS_PASSWORD_FILE; None: none, or those in NATS_URL."""
    nats_reconnect_buffer: int = RECONNECT_BUFFER_BYTES
    """Bytes a NATS connection keeps of what it sends while it reconnects."""


DEFAULTS: dict[str, str] = {
    "GPUPROXY_DATA_DIR": ".gpuproxy",
    "GPUPROXY_BIND": "127.0.0.1",
    "SERVER_PORT": "8080",
    "GRPC_PORT": "9090",
    "GPUPROXY_NATS_PORT": "0",
    "LOG_LEVEL": "info",
    "GPUPROXY_STREAM_REPLICAS": "1",
    "GPUPROXY_ACK_WAIT": "30",
    "GPUPROXY_MAX_DELIVER": "5",
    "GPUPROXY_WORKER_WINDOW": "64",
    "GPUPROXY_DRAIN_TIMEOUT": "20",
    "GPUPROXY_REQUEST_TIMEOUT": "30",
    "GPUPROXY_INFERENCE_TIMEOUT": "600",
    "GPUPROXY_PROXY_ACK_WAIT": "5",
    "GPUPROXY_AUTH_ATTEMPTS_PER_MINUTE": "60",
    "GPUPROXY_MAX_BODY_BYTES": str(16 * 1024 * 1024),
    "GPUPROXY_SIM_OWNER_PID": "0",
    "GPUPROXY_PLACEMENT": "cheapest",
    "GPUPROXY_PENDING_TIMEOUT": "60",
    "GPUPROXY_PROVISIONING_TIMEOUT": "300",
    "GPUPROXY_START_TIMEOUT": "900",
    "GPUPROXY_STOP_TIMEOUT": "300",
    "GPUPROXY_RECONCILE_INTERVAL": "10",
    "GPUPROXY_METER_INTERVAL": "5",
    "GPUPROXY_LEASE_TTL": "10",
    "GPUPROXY_NATS_RECONNECT_BUFFER_BYTES": str(RECONNECT_BUFFER_BYTES),
}
"""Every setting with a default; NATS_URL and DATABASE_URL default to the embedded ones."""

LOG_LEVELS = ("debug", "info", "warning", "error")


def _raw(env: Mapping[str, str], name: str) -> str:
    """The variable's value; set but empty counts as unset, as for NATS_URL."""
    return env.get(name, "").strip() or DEFAULTS[name]


def _int(env: Mapping[str, str], name: str, low: int, high: int) -> int:
    raw = _raw(env, name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"must be a whole number, got {raw!r}", field=name) from None
    if not low <= value <= high:
        raise ConfigError(f"must be between {low} and {high}, got {value}", field=name)
    return value


def _seconds(env: Mapping[str, str], name: str, low: float, high: float) -> float:
    raw = _raw(env, name)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"must be a number of seconds, got {raw!r}", field=name) from None
    if not low <= value <= high:
        raise ConfigError(f"must be between {low:g} and {high:g} seconds", field=name)
    return value


def _nats_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("NATS_URL", "").strip()
    if not raw:
        return None
    for url in raw.split(","):
        scheme = url.strip().split("://", 1)[0] if "://" in url else ""
        if scheme not in ("nats", "tls", "ws", "wss"):
            raise ConfigError(
                "must be nats://host:port (several separated by commas)", field="NATS_URL"
            )
    return raw


def _nats_credentials(env: Mapping[str, str]) -> NatsCredentials | None:
    user = env.get("NATS_USER", "").strip()
    password = env.get("NATS_PASSWORD", "")
    password_file = env.get("NATS_PASSWORD_FILE", "").strip()
    if not user:
        if password or password_file:
            raise ConfigError("is not set, but a NATS password is", field="NATS_USER")
        return None
    if password and password_file:
        raise ConfigError("set NATS_PASSWORD or this, not both", field="NATS_PASSWORD_FILE")
    if password_file:
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read {password_file}: {exc.strerror or type(exc).__name__}",
                field="NATS_PASSWORD_FILE",
            ) from None
        if not password:
            raise ConfigError(f"{password_file} is empty", field="NATS_PASSWORD_FILE")
    if not password:
        raise ConfigError(
            "NATS_USER is set: give its password here or in NATS_PASSWORD_FILE",
            field="NATS_PASSWORD",
        )
    return NatsCredentials(user, password)


def _database_url(env: Mapping[str, str], data_dir: Path) -> str:
    raw = env.get("DATABASE_URL", "").strip()
    if not raw:
        return f"sqlite+aiosqlite:///{data_dir / 'gpuproxy.db'}"
    # Accept the URLs people copy from elsewhere and pick the async driver for them.
    for prefix, driver in (
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("sqlite:///", "sqlite+aiosqlite:///"),
    ):
        if raw.startswith(prefix):
            return driver + raw[len(prefix) :]
    if raw.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite:///")):
        return raw
    raise ConfigError(
        "must be a postgresql:// or sqlite:/// URL (async drivers asyncpg and aiosqlite)",
        field="DATABASE_URL",
    )


def _trusted_proxies(env: Mapping[str, str]) -> tuple[str, ...]:
    found = []
    for part in env.get("GPUPROXY_TRUSTED_PROXIES", "").split(","):
        if not part.strip():
            continue
        try:
            found.append(str(ipaddress.ip_network(part.strip(), strict=False)))
        except ValueError:
            raise ConfigError(
                f"{part.strip()!r} is not an IP address or CIDR range",
                field="GPUPROXY_TRUSTED_PROXIES",
            ) from None
    return tuple(found)


def _providers(env: Mapping[str, str]) -> tuple[str, ...]:
    found = []
    for part in env.get("GPUPROXY_PROVIDERS", "").split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in PROVIDER_ALIASES:
            raise ConfigError(
                f"unknown provider {part.strip()!r}; known: {', '.join(ProviderName)}",
                field="GPUPROXY_PROVIDERS",
            )
        found.append(str(PROVIDER_ALIASES[name]))
    return tuple(found)


def _placement(env: Mapping[str, str]) -> str:
    raw = _raw(env, "GPUPROXY_PLACEMENT").lower()
    if raw not in PLACEMENT_STRATEGIES:
        raise ConfigError(
            f"must be one of {', '.join(PLACEMENT_STRATEGIES)}", field="GPUPROXY_PLACEMENT"
        )
    return raw


def _lb_strategy(env: Mapping[str, str]) -> Strategy:
    raw = env.get("LB_STRATEGY", "").strip().lower() or Strategy.ROUND_ROBIN
    try:
        return Strategy(raw)
    except ValueError:
        names = ", ".join(Strategy)
        raise ConfigError(f"must be one of {names}", field="LB_STRATEGY") from None


def load(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    data_dir = Path(env.get("GPUPROXY_DATA_DIR", DEFAULTS["GPUPROXY_DATA_DIR"])).absolute()
    log_level = env.get("LOG_LEVEL", DEFAULTS["LOG_LEVEL"]).strip().lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"must be one of {', '.join(LOG_LEVELS)}", field="LOG_LEVEL")
    settings = Settings(
        data_dir=data_dir,
        nats_url=_nats_url(env),
        database_url=_database_url(env, data_dir),
        bind=env.get("GPUPROXY_BIND", DEFAULTS["GPUPROXY_BIND"]).strip(),
        http_port=_int(env, "SERVER_PORT", 1, 65535),
        grpc_port=_int(env, "GRPC_PORT", 1, 65535),
        nats_port=_int(env, "GPUPROXY_NATS_PORT", 0, 65535),
        log_level=log_level,
        stream_replicas=_int(env, "GPUPROXY_STREAM_REPLICAS", 1, 5),
        ack_wait=_seconds(env, "GPUPROXY_ACK_WAIT", 0.5, 3600),
        max_deliver=_int(env, "GPUPROXY_MAX_DELIVER", 1, 100),
        worker_window=_int(env, "GPUPROXY_WORKER_WINDOW", 1, 4096),
        drain_timeout=_seconds(env, "GPUPROXY_DRAIN_TIMEOUT", 0, 3600),
        request_timeout=_seconds(env, "GPUPROXY_REQUEST_TIMEOUT", 0.1, 3600),
        trusted_proxies=_trusted_proxies(env),
        auth_attempts_per_minute=_int(env, "GPUPROXY_AUTH_ATTEMPTS_PER_MINUTE", 0, 1_000_000),
        # NATS caps a message at 64 MiB, and a command carries the whole request.
        max_body_bytes=_int(env, "GPUPROXY_MAX_BODY_BYTES", 1024, 64 * 1024 * 1024),
        providers=_providers(env),
        sim_dir=Path(env["GPUPROXY_SIM_DIR"]).absolute()
        if env.get("GPUPROXY_SIM_DIR", "").strip()
        else data_dir / "sim",
        sim_owner_pid=_int(env, "GPUPROXY_SIM_OWNER_PID", 0, 2**31),
        placement=_placement(env),
        pending_timeout=_seconds(env, "GPUPROXY_PENDING_TIMEOUT", 1, 86400),
        provisioning_timeout=_seconds(env, "GPUPROXY_PROVISIONING_TIMEOUT", 1, 86400),
        start_timeout=_seconds(env, "GPUPROXY_START_TIMEOUT", 1, 86400),
        stop_timeout=_seconds(env, "GPUPROXY_STOP_TIMEOUT", 1, 86400),
        reconcile_interval=_seconds(env, "GPUPROXY_RECONCILE_INTERVAL", 0.1, 3600),
        meter_interval=_seconds(env, "GPUPROXY_METER_INTERVAL", 0.1, 60),
        lease_ttl=_seconds(env, "GPUPROXY_LEASE_TTL", 1, 600),
        prices=parse_prices(env.get(PRICES_SETTING, "")),
        upstream_allow=env.get("GPUPROXY_UPSTREAM_ALLOW", "").strip(),
        inference_timeout=_seconds(env, "GPUPROXY_INFERENCE_TIMEOUT", 1, 86400),
        proxy_ack_wait=_seconds(env, "GPUPROXY_PROXY_ACK_WAIT", 0.5, 3600),
        lb_strategy=_lb_strategy(env),
        nats_credentials=_nats_credentials(env),
        nats_reconnect_buffer=_int(env, "GPUPROXY_NATS_RECONNECT_BUFFER_BYTES", 1024 * 1024, 2**30),
    )
    largest = payload_limit(settings.max_body_bytes)
    if settings.nats_reconnect_buffer < largest:
        # nats-py refuses a message larger than what is left of the buffer while it reconnects.
        raise ConfigError(
            f"must hold the largest command, {largest} bytes with GPUPROXY_MAX_BODY_BYTES "
            f"of {settings.max_body_bytes}",
            field="GPUPROXY_NATS_RECONNECT_BUFFER_BYTES",
        )
    return settings


def ensure_data_dir(data_dir: Path) -> None:
    """The data folder exists and can be written, or a clear error says why not."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"{data_dir} is not writable: {reason}", field="GPUPROXY_DATA_DIR"
        ) from None


def ensure_port_free(bind: str, port: int, field: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((bind, port))
        except OSError as exc:
            raise ConfigError(
                f"{bind}:{port} is not available: {exc.strerror}", field=field
            ) from None


def process_id(kind: str) -> str:
    """A name for one process, unique across hosts and restarts; safe in subject tokens."""
    host = "".join(c if c.isascii() and c.isalnum() else "-" for c in socket.gethostname())[:24]
    return f"{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
