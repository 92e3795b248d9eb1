"""Real gpuproxy processes for tests: started from the command line, stopped without leftovers."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from tests.conftest import free_port


def gpuproxy_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GPUPROXY_"))}
    env.update(GPUPROXY_DATA_DIR=str(tmp_path / "data"), LOG_LEVEL="info", PYTHONUNBUFFERED="1")
    env.update(settings)
    return env


def parts_env(tmp_path: Path, nats_url: str, **settings: str) -> tuple[dict[str, str], str]:
    """Settings for gateway and worker processes on `nats_url`, and the gateway's gRPC target."""
    grpc_port = free_port()
    defaults = {
        "NATS_URL": nats_url,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        "SERVER_PORT": str(free_port()),
        "GRPC_PORT": str(grpc_port),
        "JWT_SECRET": secrets.token_urlsafe(48),
    }
    env = gpuproxy_env(tmp_path, **{**defaults, **settings})
    return env, f"127.0.0.1:{grpc_port}"


@contextmanager
def gpuproxy(
    args: list[str], env: Mapping[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `gpuproxy ARGS` with output to `log`; SIGTERM then SIGKILL on the way out."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gpuproxy", *args],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_serving(
    target: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"exited with {process.returncode}:\n{log.read_text()}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"not serving after {timeout}s:\n{log.read_text()}")


def children_of(pid: int) -> set[int]:
    """Every live descendant of `pid`, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields resume after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    live = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            live.add(pid)
    return live


def provisioned(env: Mapping[str, str]) -> str:
    """Migrate the database of `env` and make an admin key there with no rate limit, as an
    operator does before starting gateways on it; returns the key."""
    import asyncio

    from gpuproxy import migrate
    from tests.e2e.system import operator_key

    migrate.upgrade(env["DATABASE_URL"])
    _, key, _ = asyncio.run(operator_key(env["NATS_URL"], env["DATABASE_URL"]))
    return key


def signed_in_key(target: str, email: str, password: str) -> str:
    """Log in over gRPC and make an API key with every scope and no limit of its own."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GPUProxyServiceStub(channel)
        login = stub.Login(pb.LoginRequest(email=email, password=password), timeout=10)
        made = stub.CreateAPIKey(
            pb.CreateAPIKeyRequest(name="tests", token=login.token, rate_limit_per_minute=0),
            timeout=10,
        )
    return str(made.api_key)


class _Details:
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)
        self.metadata = metadata


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = list(details.metadata or ())
        if not any(k in ("authorization", "x-api-key") for k, _ in metadata):
            metadata.append(("x-api-key", self._api_key))
        return continuation(_Details(details, metadata), request)


def keyed_channel(target: str, api_key: str) -> grpc.Channel:
    """A blocking channel that sends `x-api-key` on every call without a credential."""
    return grpc.intercept_channel(grpc.insecure_channel(target), _KeyInterceptor(api_key))
