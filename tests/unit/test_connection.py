"""Connecting to NATS: credentials never shown, an unreachable server is one clear error."""

from __future__ import annotations

import asyncio

import pytest

from bus.connection import connect, redact, split_servers
from schemas.errors import Unavailable
from tests.conftest import free_port


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://user:s3cret@nats.example.com:4222", "nats://***@nats.example.com:4222"),
        ("tls://user:s3cret@10.0.0.5:4443", "tls://***@10.0.0.5:4443"),
        ("nats://s3cret@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
        ("nats://:s3cret@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
        ("nats://user:s3cret@nats.example.com", "nats://***@nats.example.com"),
        ("wss://user:s3cret@nats.example.com:443/ws", "wss://***@nats.example.com:443/ws"),
    ],
)
def test_redact_removes_user_and_password_and_keeps_host_and_port(url: str, shown: str) -> None:
    redacted = redact(url)

    assert redacted == shown
    assert "s3cret" not in redacted
    assert "user" not in redacted


@pytest.mark.parametrize(
    "url",
    ["nats://127.0.0.1:4222", "tls://nats.example.com:4443", "nats://nats-1", "ws://h:80/path"],
)
def test_redact_leaves_a_url_without_credentials_untouched(url: str) -> None:
    assert redact(url) == url


@pytest.mark.parametrize(
    ("urls", "servers"),
    [
        ("nats://a:4222", ["nats://a:4222"]),
        ("nats://a:4222,nats://b:4222", ["nats://a:4222", "nats://b:4222"]),
        ("  nats://a:4222 ,  nats://b:4222  ", ["nats://a:4222", "nats://b:4222"]),
        ("nats://a:4222,,nats://b:4222,", ["nats://a:4222", "nats://b:4222"]),
        (" , ,", []),
        ("", []),
    ],
)
def test_split_servers_drops_spaces_and_empty_parts(urls: str, servers: list[str]) -> None:
    assert split_servers(urls) == servers


@pytest.mark.parametrize(
    "credentials", ["user:s3cret@", "s3cret@"], ids=["user-and-password", "token"]
)
async def test_an_unreachable_nats_is_unavailable_quickly_without_the_password(
    credentials: str,
) -> None:
    port = free_port()
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(Unavailable) as caught:
        await connect(f"nats://{credentials}127.0.0.1:{port}", name="t", connect_timeout=1)

    assert loop.time() - started < 2.5
    error = caught.value
    assert "s3cret" not in str(error)
    assert "s3cret" not in error.message
    assert f"127.0.0.1:{port}" in error.message
    assert error.retriable
    assert error.__suppress_context__


async def test_an_unreachable_nats_among_several_names_each_without_credentials() -> None:
    first, second = free_port(), free_port()

    with pytest.raises(Unavailable) as caught:
        await connect(
            f"nats://u:s3cret@127.0.0.1:{first}, nats://127.0.0.1:{second}",
            name="t",
            connect_timeout=1,
        )

    assert f"127.0.0.1:{first}" in caught.value.message
    assert f"127.0.0.1:{second}" in caught.value.message
    assert "s3cret" not in caught.value.message


async def test_connect_reaches_a_live_server_and_names_the_client(session_nats_url: str) -> None:
    client = await connect(session_nats_url, name="named-client")
    try:
        assert client.is_connected
        assert client.options["name"] == "named-client"
        info = await client.jetstream().account_info()
        assert info.limits is not None
    finally:
        await client.close()
    assert client.is_closed
