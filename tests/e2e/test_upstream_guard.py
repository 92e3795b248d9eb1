"""No request reaches an address the proxy refuses: a machine whose registered endpoint is
loopback (by address, IPv4-mapped, or a name resolving to it) is never contacted, and a
machine that redirects is not followed. Listeners count the connections they accept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import openai
import pytest
from nats.aio.client import Client

from schemas.subjects import WorkerKind
from tests.e2e.machines import register_endpoint, sdk
from tests.e2e.system import System, running_system

PROMPT = [{"role": "user", "content": "hello"}]


class Listener:
    """A plain TCP server that counts connections and answers as `answer` says."""

    def __init__(self, answer: Callable[[bytes], bytes] | None = None) -> None:
        self.accepted = 0
        self.port = 0
        self._answer = answer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        request = await reader.read(65536)
        if self._answer is not None:
            writer.write(self._answer(request))
            await writer.drain()
        writer.close()


@asynccontextmanager
async def listening(listener: Listener) -> AsyncIterator[Listener]:
    server = await asyncio.start_server(listener._serve, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def proxied(nats_url: str, migrated_database: str) -> AsyncIterator[System]:
    async with running_system(nats_url, migrated_database, kinds=(WorkerKind.PROXY,)) as system:
        yield system


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"], ids=["loopback", "name", "mapped"]
)
async def test_a_machine_at_a_refused_address_is_never_contacted(
    proxied: System, nc: Client, host: str
) -> None:
    async with listening(Listener()) as trap:
        await register_endpoint(
            nc, f"http://{host}:{trap.port}", owner=proxied.admin_id, provider="vastai"
        )
        await asyncio.sleep(1.0)  # the proxy has tried to ask it which models it serves
        async with sdk(proxied) as client:
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="anything", messages=PROMPT)
    assert trap.accepted == 0


def redirecting(to: str) -> Callable[[bytes], bytes]:
    def answer(request: bytes) -> bytes:
        if request.startswith(b"GET /v1/models"):
            body = b'{"object":"list","data":[{"id":"redirecting-model","object":"model"}]}'
            return (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\nconnection: close\r\n\r\n"
                + body
            )
        return (
            b"HTTP/1.1 302 Found\r\nlocation: "
            + to.encode()
            + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )

    return answer


async def test_a_redirect_is_not_followed(proxied: System, nc: Client) -> None:
    async with listening(Listener()) as target:
        elsewhere = f"http://localhost:{target.port}/v1/chat/completions"
        async with listening(Listener(redirecting(elsewhere))) as machine:
            await register_endpoint(
                nc, f"http://127.0.0.1:{machine.port}", owner=proxied.admin_id, provider="sim"
            )
            async with sdk(proxied) as client:
                for _ in range(100):
                    if (await client.models.list()).data:
                        break
                    await asyncio.sleep(0.05)
                with pytest.raises(openai.APIStatusError) as refused:
                    await client.chat.completions.create(model="redirecting-model", messages=PROMPT)
    assert refused.value.status_code == 503
    assert target.accepted == 0
