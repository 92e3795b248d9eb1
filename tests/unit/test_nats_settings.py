"""The NATS settings: each process's credentials, and one reconnect buffer for every process."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus.connection import RECONNECT_BUFFER_BYTES, NatsCredentials
from gpuproxy import settings
from gpuproxy.natsd import payload_limit
from schemas.errors import ConfigError


def test_a_user_and_password_become_the_credentials() -> None:
    loaded = settings.load({"NATS_USER": "gateway", "NATS_PASSWORD": "s3cret"})

    assert loaded.nats_credentials == NatsCredentials("gateway", "s3cret")
    assert "s3cret" not in repr(loaded)


def test_the_password_can_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "gateway.password"
    secret.write_text("s3cret\n")

    loaded = settings.load({"NATS_USER": "gateway", "NATS_PASSWORD_FILE": str(secret)})

    assert loaded.nats_credentials == NatsCredentials("gateway", "s3cret")


def test_without_a_user_there_are_no_credentials() -> None:
    assert settings.load({}).nats_credentials is None


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"NATS_PASSWORD": "s3cret"}, "NATS_USER"),
        ({"NATS_USER": "gateway"}, "NATS_PASSWORD"),
        (
            {"NATS_USER": "gateway", "NATS_PASSWORD": "s3cret", "NATS_PASSWORD_FILE": "/x"},
            "NATS_PASSWORD_FILE",
        ),
        ({"NATS_USER": "gateway", "NATS_PASSWORD_FILE": "/nowhere/pw"}, "NATS_PASSWORD_FILE"),
    ],
    ids=["password-without-user", "user-without-password", "both-passwords", "missing-file"],
)
def test_incomplete_credentials_name_the_setting_without_the_password(
    env: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings.load(env)

    assert caught.value.field == field
    assert "s3cret" not in caught.value.message


def test_the_reconnect_buffer_defaults_to_64_mib() -> None:
    assert settings.load({}).nats_reconnect_buffer == RECONNECT_BUFFER_BYTES == 64 * 1024 * 1024


def test_a_reconnect_buffer_smaller_than_the_largest_command_is_refused() -> None:
    body = 16 * 1024 * 1024
    env = {
        "GPUPROXY_MAX_BODY_BYTES": str(body),
        "GPUPROXY_NATS_RECONNECT_BUFFER_BYTES": str(payload_limit(body) - 1),
    }

    with pytest.raises(ConfigError) as caught:
        settings.load(env)

    assert caught.value.field == "GPUPROXY_NATS_RECONNECT_BUFFER_BYTES"
    assert str(payload_limit(body)) in caught.value.message
