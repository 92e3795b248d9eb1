"""The real command line on bad configuration: exit code 2, one line naming the setting.

Each case runs `python -m gpuproxy` as a subprocess in its own session with a clean copy of the
environment, so the settings of the machine running the tests cannot leak in, and the ports
`up` checks are free ones rather than 8080/9090.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpuproxy.settings import DEFAULTS
from tests.conftest import free_port

TIMEOUT = 30.0
SETTINGS = (*DEFAULTS, "NATS_URL", "DATABASE_URL", "GPUPROXY_SUPERVISOR_PID")


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


def gpuproxy(tmp_path: Path, *args: str, **settings: str) -> Outcome:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(
        GPUPROXY_DATA_DIR=str(tmp_path / "data"),
        SERVER_PORT=str(free_port()),
        GRPC_PORT=str(free_port()),
    )
    env.update(settings)
    with subprocess.Popen(
        [sys.executable, "-m", "gpuproxy", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            # A case that wrongly started the system: stop everything it spawned.
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"gpuproxy {' '.join(args)} still ran after {TIMEOUT}s:\n{stderr}")
    return Outcome(process.returncode, stdout, stderr)


def assert_one_line_naming(outcome: Outcome, setting: str) -> str:
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert outcome.code == 2, outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert outcome.stdout == ""
    line = lines[0]
    assert line.startswith(f"gpuproxy: {setting}: "), line
    return line


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_up_with_a_port_that_is_not_a_number_names_the_setting(tmp_path: Path) -> None:
    line = assert_one_line_naming(gpuproxy(tmp_path, "up", SERVER_PORT="abc"), "SERVER_PORT")

    assert "'abc'" in line


def test_up_with_a_port_out_of_range_names_the_setting(tmp_path: Path) -> None:
    line = assert_one_line_naming(gpuproxy(tmp_path, "up", GRPC_PORT="70000"), "GRPC_PORT")

    assert "65535" in line


def test_up_with_an_unreachable_nats_names_it_without_the_password(tmp_path: Path) -> None:
    port = free_port()

    outcome = gpuproxy(tmp_path, "up", NATS_URL=f"nats://u:hunter2@127.0.0.1:{port}")

    line = assert_one_line_naming(outcome, "NATS_URL")
    assert f"127.0.0.1:{port}" in line
    assert "hunter2" not in outcome.stderr + outcome.stdout


def test_up_with_a_data_dir_under_a_file_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")

    outcome = gpuproxy(tmp_path, "up", GPUPROXY_DATA_DIR=str(tmp_path / "file" / "sub"))

    assert_one_line_naming(outcome, "GPUPROXY_DATA_DIR")


def test_up_with_a_port_already_in_use_names_the_setting(tmp_path: Path, held_port: int) -> None:
    outcome = gpuproxy(tmp_path, "up", SERVER_PORT=str(held_port))

    line = assert_one_line_naming(outcome, "SERVER_PORT")
    assert str(held_port) in line


def test_up_with_the_grpc_port_already_in_use_names_the_setting(
    tmp_path: Path, held_port: int
) -> None:
    outcome = gpuproxy(tmp_path, "up", GRPC_PORT=str(held_port))

    assert_one_line_naming(outcome, "GRPC_PORT")


def test_a_worker_without_nats_url_names_the_setting(tmp_path: Path) -> None:
    assert_one_line_naming(gpuproxy(tmp_path, "worker", "provisioner"), "NATS_URL")


def test_the_gateway_with_an_unknown_log_level_names_the_setting(tmp_path: Path) -> None:
    outcome = gpuproxy(tmp_path, "gateway", LOG_LEVEL="loud")

    assert_one_line_naming(outcome, "LOG_LEVEL")


def test_a_bad_setting_does_not_create_the_data_dir(tmp_path: Path) -> None:
    gpuproxy(tmp_path, "up", SERVER_PORT="abc")

    assert not (tmp_path / "data").exists()


def test_an_unknown_worker_kind_is_a_usage_error_naming_the_choices(tmp_path: Path) -> None:
    outcome = gpuproxy(tmp_path, "worker", "gpu")

    assert outcome.code != 0
    assert "Traceback" not in outcome.stderr
    assert "Usage:" in outcome.stderr
    assert "'gpu'" in outcome.stderr
    for kind in ("provisioner", "proxy", "billing"):
        assert kind in outcome.stderr
