"""The pooled HTTP client the proxy worker speaks to upstreams (GPU machines) with.

One pool of keep-alive connections per instance, so a slow or dying machine never holds
connections another one needs, and `forget` drops everything of an instance that is gone.
Every connection goes to an address `addresses` has checked: the pool's resolver runs the
check on each new connection (a name is resolved again, so a DNS answer that changed since
is checked again) and hands the connector only the checked addresses; an IP literal, which
the connector never resolves, is checked before the request. The URL itself is left as
written (no rewriting to the IP), so the Host header and the TLS name (SNI and certificate
check) stay the machine's own name.

Built on aiohttp, chosen by measurement against httpx on the sim upstream
(`python -m bench.upstream_client`): aiohttp served 2.4x (whole answers, one at a time) to
5.7x (32 at once) the requests per second, and 1.6x to 4.1x on streamed answers, for a
tenth to under half of the client's CPU per request. Callers never see aiohttp: its errors become
gpuproxy's (`Unavailable`, `DeadlineExceeded`, `Refused`).

The pool forwards and nothing more: no redirect is followed (a 3xx comes back as it is), no
cookie is kept between requests (they belong to different callers), no body is decoded, no
proxy from the environment is used, and the only headers added are Host and the body's
framing.
"""

from __future__ import annotations

import io
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Self

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address

from schemas.errors import DeadlineExceeded, GpuproxyError, Unavailable
from workers.proxy.addresses import AllowList, Refused, check, literal, parse_url, resolve

Headers = Mapping[str, str] | Sequence[tuple[str, str]]

MAX_CONNECTIONS = 32
"""Connections one instance's pool opens at most; a request beyond waits for a free one."""
KEEPALIVE_SECONDS = 4.0
"""How long an idle connection is kept. Below the 5 s after which uvicorn (vLLM's server)
closes an idle one, so a request is never written into a connection the server is closing:
a POST that meets that race cannot be sent again safely."""
CONNECT_SECONDS = 5.0
"""Resolving, connecting (TLS included) and waiting for a free connection in the pool."""

_OURS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})
"""Request headers the pool sets itself: Host from the URL, framing from the body."""
_NOT_AUTOMATIC = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
"""Headers aiohttp would add unasked; the caller's own are forwarded instead."""


class _CheckingResolver(AbstractResolver):
    """The connector's resolver: every address handed out has passed the guard."""

    def __init__(self, allow: AllowList, trusted_loopback: bool) -> None:
        self._allow = allow
        self._trusted_loopback = trusted_loopback

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await resolve(
            host,
            port,
            allow=self._allow,
            trusted_loopback=self._trusted_loopback,
            family=family,
        )
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET if address.version == 4 else socket.AF_INET6,
                proto=socket.IPPROTO_TCP,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class UpstreamResponse:
    """An upstream's answer once its head has arrived; the body is read as it comes.

    Use as `async with`: leaving the block, or `aclose()`, closes the connection unless the
    body was read to its end, in which case the connection has gone back to the pool.
    """

    def __init__(self, response: aiohttp.ClientResponse, host: str, timeout: float) -> None:
        self._response = response
        self._host = host
        self._timeout = timeout
        self._closed = False
        self.status: int = response.status
        self.headers: list[tuple[str, str]] = list(response.headers.items())
        """In the order received, repeated names kept."""

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        return self._response.headers.get(name)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive. Stopping early closes the connection; after
        `aclose()` (from another task, say) the bytes simply end."""
        finished = False
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
            finished = True
        except TimeoutError:
            if self._closed:
                return
            raise DeadlineExceeded(
                f"upstream {self._host!r} sent nothing for {self._timeout:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            if self._closed:
                return
            raise Unavailable(
                f"upstream {self._host!r} broke off its answer ({type(exc).__name__})"
            ) from None
        finally:
            if not finished:
                self._response.close()

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def aclose(self) -> None:
        """Close the connection now, unless the body was read to its end (then it is back
        in the pool already).

        Nothing is drained back into the pool: the upstream sees the disconnect at once and
        can stop generating tokens nobody will read.
        """
        self._closed = True
        self._response.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


LARGE_BODY = 1024 * 1024
"""Bytes past which a request body is streamed to the machine rather than written at once."""


class UpstreamPool:
    """A pool of keep-alive connections per instance, each connection to a checked address."""

    def __init__(
        self,
        *,
        allow: AllowList | None = None,
        max_connections: int = MAX_CONNECTIONS,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
        connect_seconds: float = CONNECT_SECONDS,
    ) -> None:
        self._allow = allow or AllowList()
        self._max_connections = max_connections
        self._keepalive_seconds = keepalive_seconds
        self._connect_seconds = connect_seconds
        # Keyed by trust as well: a call without it never rides a connection made with it.
        self._sessions: dict[tuple[str, bool], aiohttp.ClientSession] = {}
        self._closed = False

    async def request(
        self,
        instance_key: str,
        url: str,
        *,
        method: str = "POST",
        headers: Headers = (),
        body: bytes = b"",
        timeout: float,
        trusted_loopback: bool = False,
    ) -> UpstreamResponse:
        """Send one request to an instance; returns once the answer's head has arrived.

        `timeout` bounds every wait for the upstream once connected (its head, then each
        piece of the body); connecting has its own bound. Raises `Refused` for an address
        the guard refuses (nothing is sent, no connection is made), `Unavailable` when the
        upstream cannot be reached or breaks off, `DeadlineExceeded` when it is silent.
        """
        if self._closed:
            raise Unavailable("the upstream pool is closed")
        target = parse_url(url)
        request_url = _connector_url(url, target.host)
        self._check_literal(request_url.raw_host or "", trusted_loopback)
        session = self._session(instance_key, trusted_loopback)
        try:
            response = await session.request(
                method,
                request_url,
                headers=[(k, v) for k, v in _pairs(headers) if k.lower() not in _OURS],
                # aiohttp writes a large bytes body in one go from the event loop (and warns);
                # a stream of it is written in pieces.
                data=(io.BytesIO(body) if len(body) > LARGE_BODY else body) or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self._connect_seconds,
                    sock_connect=self._connect_seconds,
                    sock_read=timeout,
                ),
            )
        except aiohttp.ConnectionTimeoutError:
            raise DeadlineExceeded(
                f"could not connect to upstream {target.host!r} within "
                f"{self._connect_seconds:g} s, or none of its connections came free"
            ) from None
        except TimeoutError:
            raise DeadlineExceeded(
                f"upstream {target.host!r} did not answer within {timeout:g} s"
            ) from None
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.__cause__, GpuproxyError):
                raise exc.__cause__ from None
            raise Unavailable(f"upstream host {target.host!r} does not resolve") from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.strerror or type(exc).__name__
            raise Unavailable(f"cannot connect to upstream {target.host!r}: {reason}") from None
        except aiohttp.ClientError as exc:
            raise Unavailable(
                f"upstream {target.host!r} closed the connection without an answer "
                f"({type(exc).__name__})"
            ) from None
        return UpstreamResponse(response, target.host, timeout)

    def _check_literal(self, host: str, trusted_loopback: bool) -> None:
        """The connector skips its resolver for a host that looks like an IP address (by
        its own test, used here too), so such a host is checked before the request."""
        if not is_ip_address(host):
            return
        address = literal(host)
        if address is None:
            # 127.1 or 2130706433: a numeric host other than a plain address.
            raise Refused(host, "it is not a canonical IP address")
        check(host, address, allow=self._allow, trusted_loopback=trusted_loopback)

    def _session(self, instance_key: str, trusted_loopback: bool) -> aiohttp.ClientSession:
        key = (instance_key, trusted_loopback)
        session = self._sessions.get(key)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                keepalive_timeout=self._keepalive_seconds,
                resolver=_CheckingResolver(self._allow, trusted_loopback),
                # Resolve, and so check, on every new connection: no cached answer.
                use_dns_cache=False,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=_NOT_AUTOMATIC,
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_seconds),
            )
            self._sessions[key] = session
        return session

    async def forget(self, instance_key: str) -> None:
        """Close every connection to an instance (it is gone, or its address changed)."""
        for trusted in (False, True):
            session = self._sessions.pop((instance_key, trusted), None)
            if session is not None:
                await session.close()

    async def close(self) -> None:
        """Close every pool; later requests raise `Unavailable`."""
        self._closed = True
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _connector_url(url: str, host: str) -> yarl.URL:
    """The URL as aiohttp reads it, held to what `parse_url` accepted: two parsers that
    disagree about a URL are how a guard is walked around."""
    try:
        parsed = yarl.URL(url.strip())
    except ValueError:
        raise Refused(host, "its URL cannot be parsed") from None
    if parsed.scheme not in ("http", "https") or parsed.raw_host is None:
        raise Refused(host, "its URL must be http:// or https:// with a host")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise Refused(host, "its URL carries credentials (user@ or user:password@)")
    return parsed


def _pairs(headers: Headers) -> Sequence[tuple[str, str]]:
    return list(headers.items()) if isinstance(headers, Mapping) else headers
