"""`gpuproxy up` as a user runs it: everything starts, answers, and stops without leftovers."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.e2e.processes import (
    alive,
    children_of,
    gpuproxy,
    gpuproxy_env,
    keyed_channel,
    signed_in_key,
    wait_serving,
)

pytestmark = pytest.mark.slow


def healthy(stub: pb_grpc.GPUProxyServiceStub, timeout: float = 30) -> pb.HealthCheckResponse:
    deadline = time.monotonic() + timeout
    while True:
        answer: pb.HealthCheckResponse = stub.HealthCheck(pb.HealthCheckRequest(), timeout=5)
        if answer.status == "healthy" or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


ADMIN = ("ops@example.com", "an operator's long password")


def start_up(tmp_path: Path) -> tuple[dict[str, str], str]:
    grpc_port = free_port()
    env = gpuproxy_env(
        tmp_path,
        SERVER_PORT=str(free_port()),
        GRPC_PORT=str(grpc_port),
        GPUPROXY_ADMIN_EMAIL=ADMIN[0],
        GPUPROXY_ADMIN_PASSWORD=ADMIN[1],
    )
    return env, f"127.0.0.1:{grpc_port}"


def admin_channel(target: str) -> grpc.Channel:
    return keyed_channel(target, signed_in_key(target, *ADMIN))


def test_up_serves_a_ping_through_jetstream_and_stops_everything_on_sigterm(
    tmp_path: Path,
) -> None:
    env, target = start_up(tmp_path)
    log = tmp_path / "up.log"
    with gpuproxy(["up"], env, log) as up:
        wait_serving(target, up, log)
        key = signed_in_key(target, *ADMIN)
        stub = pb_grpc.GPUProxyServiceStub(keyed_channel(target, key))
        health = healthy(stub)
        answer = stub.Ping(pb.PingRequest(message="first run", worker_kind="billing"), timeout=10)
        cli = [sys.executable, "-m", "gpuproxy", "ping", "--target", target, "--kind", "proxy"]
        by_cli = subprocess.run(
            cli, env={**env, "GPUPROXY_API_KEY": key}, capture_output=True, text=True, timeout=60
        )
        refused = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
        family = children_of(up.pid)
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
    assert health.status == "healthy", dict(health.details)
    assert health.details["nats"] == health.details["database"] == "ok"
    assert (answer.message, answer.worker_kind) == ("first run", "billing")
    assert by_cli.returncode == 0, by_cli.stderr
    assert "answered by proxy" in by_cli.stdout
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr
    assert len(family) >= 5, "nats-server, gateway and three workers"
    assert code == 0, log.read_text()
    assert not alive(family)
    assert (tmp_path / "data" / "gpuproxy.db").exists()
    assert "nats-server stopped" in log.read_text()


def test_a_supervisor_killed_outright_leaves_no_process_behind(tmp_path: Path) -> None:
    env, target = start_up(tmp_path)
    log = tmp_path / "up.log"
    with gpuproxy(["up"], env, log) as up:
        wait_serving(target, up, log)
        family = children_of(up.pid)
        up.kill()
        up.wait()
    deadline = time.monotonic() + 15
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(family), log.read_text()


def test_up_starts_a_crashed_worker_again(tmp_path: Path) -> None:
    env, target = start_up(tmp_path)
    log = tmp_path / "up.log"
    with gpuproxy(["up"], env, log) as up:
        wait_serving(target, up, log)
        channel = admin_channel(target)
        stub = pb_grpc.GPUProxyServiceStub(channel)
        before = stub.Ping(pb.PingRequest(worker_kind="proxy"), timeout=10)
        victim = int(before.worker_id.split("-")[-2])
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                after = stub.Ping(pb.PingRequest(worker_kind="proxy"), timeout=2)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, log.read_text()
    assert after.worker_id != before.worker_id
    assert "proxy exited with -9; starting it again" in log.read_text()


def test_sigterm_lets_a_call_in_flight_finish_before_everything_stops(tmp_path: Path) -> None:
    env, target = start_up(tmp_path)
    log = tmp_path / "up.log"
    with gpuproxy(["up"], env, log) as up, ThreadPoolExecutor(1) as pool:
        wait_serving(target, up, log)
        channel = admin_channel(target)
        stub = pb_grpc.GPUProxyServiceStub(channel)
        healthy(stub)
        call = pool.submit(
            stub.Ping, pb.PingRequest(message="finish me", delay_ms=2000), timeout=30
        )
        time.sleep(0.5)
        up.send_signal(signal.SIGTERM)
        answer = call.result(timeout=30)
        code = up.wait(60)
    assert answer.message == "finish me"
    assert code == 0


def login(target: str, email: str, password: str) -> pb.LoginResponse:
    with grpc.insecure_channel(target) as channel:
        answer: pb.LoginResponse = pb_grpc.GPUProxyServiceStub(channel).Login(
            pb.LoginRequest(email=email, password=password), timeout=10
        )
        return answer


def role_in(token: str) -> str:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["role"])


def test_a_fresh_up_makes_an_admin_and_shows_its_password_only_once(tmp_path: Path) -> None:
    env, target = start_up(tmp_path)
    del env["GPUPROXY_ADMIN_EMAIL"], env["GPUPROXY_ADMIN_PASSWORD"]
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with gpuproxy(["up"], env, first_log) as up:
        wait_serving(target, up, first_log)
        shown = re.search(r"first admin created: (\S+) with password (\S+)", first_log.read_text())
        assert shown is not None, first_log.read_text()
        answer = login(target, shown.group(1), shown.group(2))
    with gpuproxy(["up"], env, second_log) as up:
        wait_serving(target, up, second_log)
        again = login(target, shown.group(1), shown.group(2))
    assert role_in(answer.token) == role_in(again.token) == "admin"
    assert "first admin created" not in second_log.read_text()
    assert shown.group(2) not in (tmp_path / "data" / "gpuproxy.db").read_bytes().decode(
        errors="replace"
    )


def test_up_takes_the_first_admin_from_the_environment(tmp_path: Path) -> None:
    env, target = start_up(tmp_path)
    env.update(GPUPROXY_ADMIN_EMAIL="root@example.com", GPUPROXY_ADMIN_PASSWORD="a long admin pass")
    log = tmp_path / "up.log"
    with gpuproxy(["up"], env, log) as up:
        wait_serving(target, up, log)
        answer = login(target, "root@example.com", "a long admin pass")
    assert role_in(answer.token) == "admin"
    assert "a long admin pass" not in log.read_text()
