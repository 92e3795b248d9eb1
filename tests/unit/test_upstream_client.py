"""The upstream pool over real sockets: what it connects to, what it sends, when it lets go.

Each test runs a raw asyncio HTTP/1.1 listener on 127.0.0.1 that counts the connections it
accepts, so "no connection was made" is observed by the server, not inferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from schemas.errors import DeadlineExceeded, Unavailable
from workers.proxy.addresses import AddressClass, AllowList, Refused, parse_allow_list
from workers.proxy.upstream_client import UpstreamPool

LOOPBACK = parse_allow_list("127.0.0.0/8")
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"

Answer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def answer_ok(
    head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(OK)
    await writer.drain()


class Listener:
    """A keep-alive HTTP/1.1 server: counts accepted connections, records request heads."""

    def __init__(self, answer: Answer = answer_ok) -> None:
        self.answer = answer
        self.accepted = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.closed = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, path: str = "/v1/chat/completions", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                self.heads.append(head)
                self.bodies.append(await reader.readexactly(content_length(head)))
                await self.answer(head, reader, writer)
        except ConnectionError:
            return
        finally:
            self.closed.set()
            writer.close()


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def header_lines(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.partition(":") for line in lines if line)
    return {name.strip().lower(): value.strip() for name, _, value in pairs}


@contextlib.asynccontextmanager
async def listening(answer: Answer = answer_ok) -> AsyncIterator[Listener]:
    listener = Listener(answer)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop()


@contextlib.asynccontextmanager
async def pool_of(allow: AllowList | None = None) -> AsyncIterator[UpstreamPool]:
    async with UpstreamPool(allow=allow, connect_seconds=2.0) as pool:
        yield pool


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", AddressClass.LOOPBACK),
        ("localhost", AddressClass.LOOPBACK),
        ("127.1", None),
        ("2130706433", None),
    ],
)
async def test_a_refused_upstream_receives_no_connection(
    host: str, kind: AddressClass | None
) -> None:
    async with listening() as listener, pool_of() as pool:
        with pytest.raises(Refused) as refused:
            await pool.request("i-1", listener.url(host=host), body=b"{}", timeout=2.0)
        await asyncio.sleep(0.05)  # time for a connection, had one been started
        assert listener.accepted == 0
        assert refused.value.address_class is kind
        assert host in refused.value.message


async def test_the_allow_list_lets_the_request_reach_a_loopback_upstream() -> None:
    async with listening() as listener, pool_of(LOOPBACK) as pool:
        response = await pool.request("i-1", listener.url(), body=b'{"a":1}', timeout=2.0)
        async with response:
            assert response.status == 200
            assert await response.read() == b"ok"
    assert listener.accepted == 1
    assert listener.bodies == [b'{"a":1}']


async def test_trusted_loopback_lets_the_request_reach_a_loopback_upstream() -> None:
    async with listening() as listener, pool_of() as pool:
        response = await pool.request(
            "i-1", listener.url(host="localhost"), body=b"{}", timeout=2.0, trusted_loopback=True
        )
        async with response:
            assert response.status == 200
        # The same instance without trust is refused: it never rides the trusted connection.
        with pytest.raises(Refused):
            await pool.request("i-1", listener.url(), body=b"{}", timeout=2.0)
    assert listener.accepted == 1


async def test_a_redirect_is_returned_as_it_is_and_never_followed() -> None:
    async with listening() as elsewhere:
        location = elsewhere.url("/stolen")

        async def redirect(
            head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            writer.write(
                b"HTTP/1.1 302 Found\r\nLocation: "
                + location.encode()
                + b"\r\nContent-Length: 0\r\n\r\n"
            )
            await writer.drain()

        async with listening(redirect) as listener, pool_of(LOOPBACK) as pool:
            response = await pool.request("i-1", listener.url(), body=b"{}", timeout=2.0)
            async with response:
                assert response.status == 302
                assert response.header("location") == location
                assert await response.read() == b""
        await asyncio.sleep(0.05)
        assert elsewhere.accepted == 0


async def test_keep_alive_serves_two_requests_over_one_connection() -> None:
    async with listening() as listener, pool_of(LOOPBACK) as pool:
        for _ in range(2):
            response = await pool.request("i-1", listener.url(), body=b"{}", timeout=2.0)
            async with response:
                assert await response.read() == b"ok"
    assert len(listener.heads) == 2
    assert listener.accepted == 1


async def test_each_instance_has_a_pool_of_its_own() -> None:
    async with listening() as listener, pool_of(LOOPBACK) as pool:
        for instance in ("i-1", "i-2"):
            response = await pool.request(instance, listener.url(), body=b"{}", timeout=2.0)
            async with response:
                await response.read()
    assert listener.accepted == 2


async def test_aclose_mid_stream_makes_the_upstream_see_the_disconnect() -> None:
    seen: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def stream_until_gone(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        writer.write(b"e\r\ndata: token1\n\n\r\n")
        await writer.drain()
        # A generating server: it only learns of the client's departure from the socket.
        with contextlib.suppress(ConnectionError):
            while await reader.read(1024):
                pass
        seen.set_result(time.perf_counter())

    async with listening(stream_until_gone) as listener, pool_of(LOOPBACK) as pool:
        response = await pool.request("i-1", listener.url(), body=b"{}", timeout=5.0)
        chunks = response.aiter_bytes()
        assert await anext(chunks) == b"data: token1\n\n"
        closed_at = time.perf_counter()
        await response.aclose()
        seen_at = await asyncio.wait_for(seen, 5.0)
        delay_ms = (seen_at - closed_at) * 1000
        print(f"upstream saw the disconnect {delay_ms:.1f} ms after aclose()")
        assert delay_ms < 1000
        # The reader sees the end it asked for, not an error.
        assert [chunk async for chunk in chunks] == []


async def test_the_host_header_carries_the_original_name() -> None:
    async with listening() as listener, pool_of() as pool:
        response = await pool.request(
            "i-1",
            listener.url(host="localhost"),
            headers={"Host": "evil.example", "x-request-id": "r-1"},
            body=b"{}",
            timeout=2.0,
            trusted_loopback=True,
        )
        async with response:
            await response.read()
    headers = header_lines(listener.heads[0])
    assert headers["host"] == f"localhost:{listener.port}"
    assert headers["x-request-id"] == "r-1"
    # Nothing the caller did not ask for: no decoding is negotiated behind its back.
    assert "accept-encoding" not in headers
    assert "user-agent" not in headers


async def test_a_cookie_from_one_answer_is_never_sent_with_the_next_request() -> None:
    async def set_cookie(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: session=abc\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with listening(set_cookie) as listener, pool_of(LOOPBACK) as pool:
        for _ in range(2):
            async with await pool.request("i-1", listener.url(), timeout=2.0) as response:
                await response.read()
    assert "cookie" not in header_lines(listener.heads[1])


async def test_forget_closes_the_connections_of_an_instance() -> None:
    async with listening() as listener, pool_of(LOOPBACK) as pool:
        async with await pool.request("i-1", listener.url(), timeout=2.0) as response:
            await response.read()
        await pool.forget("i-1")
        await asyncio.wait_for(listener.closed.wait(), 2.0)


async def test_an_upstream_that_is_not_listening_is_unavailable() -> None:
    async with listening() as listener:
        url = listener.url()
    async with pool_of(LOOPBACK) as pool:
        with pytest.raises(Unavailable) as unavailable:
            await pool.request("i-1", url, timeout=2.0)
    assert "cannot connect to upstream '127.0.0.1'" in unavailable.value.message


async def test_an_upstream_silent_past_the_timeout_is_a_deadline_exceeded() -> None:
    async def silent(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read()

    async with listening(silent) as listener, pool_of(LOOPBACK) as pool:
        with pytest.raises(DeadlineExceeded):
            await pool.request("i-1", listener.url(), body=b"{}", timeout=0.2)


async def test_a_name_that_does_not_resolve_is_unavailable() -> None:
    async with pool_of() as pool:
        with pytest.raises(Unavailable) as unavailable:
            await pool.request("i-1", "http://no-such-machine.invalid:8000/", timeout=2.0)
    assert "no-such-machine.invalid" in unavailable.value.message


async def test_a_closed_pool_sends_nothing() -> None:
    async with listening() as listener:
        pool = UpstreamPool(allow=LOOPBACK)
        await pool.close()
        with pytest.raises(Unavailable):
            await pool.request("i-1", listener.url(), timeout=2.0)
    assert listener.accepted == 0
