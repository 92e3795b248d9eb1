"""Guessing credentials costs the guesser: an unknown API key is read from the access bucket
once, not on every try, and an address whose credentials keep failing is refused with 429
before anything it presents is looked up, on both doors. Reads of the bucket are watched on
the wire: a plain subscriber to JetStream's API subjects sees every one."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
import httpx
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.connection import connect
from gateway.auth.view import AccessView
from gateway.pb import gpuproxy_pb2 as pb
from schemas import topology
from schemas.access import KeyAccess, Scope, api_key_key
from schemas.subjects import WorkerKind
from tests.e2e.access_client import clear_of_a_new_minute, eventually, grpc_status
from tests.e2e.system import running_system

PING = pb.PingRequest(message="hi", worker_kind="proxy")


def unknown_key() -> tuple[str, str]:
    """A well-formed key no one issued: its public id and its full text."""
    public_id = secrets.token_hex(8)
    return public_id, f"gpuproxy_{public_id}_{'A' * 43}"


class BucketReads:
    """Every request to JetStream's API, as subject and body, in the order sent."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def note(self, msg: Msg) -> None:
        self.seen.append(f"{msg.subject} {msg.data.decode(errors='replace')}")

    def of(self, public_id: str) -> int:
        return sum(api_key_key(public_id) in request for request in self.seen)

    async def watching(self, read_a_key: Callable[[str], Awaitable[object]]) -> None:
        """Return once a read made through `read_a_key` has been seen.

        A subscriber to JetStream's API subjects that has just subscribed and flushed still
        misses the next request another connection sends, now and then (about one run in
        30 here): until a probe read shows up, the count of reads would be short by one.
        """
        for _ in range(50):
            probe_id, _ = unknown_key()
            await read_a_key(probe_id)

            async def seen(probe_id: str = probe_id) -> bool:
                return self.of(probe_id) >= 1

            try:
                await eventually(seen, within=0.2)
            except AssertionError:
                continue
            return
        raise AssertionError("the spy never saw a read")


@asynccontextmanager
async def bucket_reads(nats_url: str) -> AsyncIterator[BucketReads]:
    nc = await connect(nats_url, name="test-spy")
    reads = BucketReads()
    await nc.subscribe("$JS.API.>", cb=reads.note)
    await nc.flush()
    try:
        yield reads
    finally:
        await nc.close()


async def test_an_unknown_key_costs_one_bucket_read_until_it_is_made(
    nats_url: str, nc: Client
) -> None:
    public_id, _ = unknown_key()
    view = AccessView(nc.jetstream())
    await view.start()
    try:
        async with bucket_reads(nats_url) as reads:
            await reads.watching(view.api_key)
            answers = [await view.api_key(public_id) for _ in range(5)]
            control_id, _ = unknown_key()
            await view.api_key(control_id)
            await eventually(lambda: _at_least(reads.of(control_id), 1))
            read_before_made = reads.of(public_id)

            made = KeyAccess(
                public_id=public_id,
                user_id="u1",
                digest="0" * 64,
                scopes=frozenset({Scope.INFERENCE}),
                expires_at_ms=None,
                revoked=False,
            )
            bucket = await nc.jetstream().key_value(topology.ACCESS_BUCKET)
            await bucket.put(api_key_key(public_id), msgspec.json.encode(made))
            started = time.monotonic()

            async def known() -> bool:
                return await view.api_key(public_id) == made

            await eventually(known, within=2.0)
    finally:
        await view.stop()

    assert answers == [None] * 5
    assert read_before_made == 1, reads.seen
    assert time.monotonic() - started < 2.0  # the watcher ended the memory, not its timer


async def _at_least(count: int, wanted: int) -> bool:
    return count >= wanted


async def test_failed_credentials_from_one_address_are_refused_before_any_lookup_on_both_doors(
    nats_url: str, migrated_database: str
) -> None:
    await clear_of_a_new_minute()
    async with (
        running_system(
            nats_url,
            migrated_database,
            kinds=(WorkerKind.PROXY,),
            trusted_proxies=("127.0.0.1/32",),
            auth_attempts_per_minute=3,
        ) as system,
        httpx.AsyncClient(base_url=system.http_base, timeout=10) as http,
        bucket_reads(nats_url) as reads,
    ):
        probes = iter(range(1, 60))

        async def read_through_the_gateway(public_id: str) -> None:
            # Each probe from its own address, so no probe counts against another's limit.
            address = f"198.51.100.{next(probes)}"
            key = f"gpuproxy_{public_id}_{'A' * 43}"
            headers = {"x-forwarded-for": address, "x-api-key": key}
            await http.get("/api/v1/user/me", headers=headers)

        await reads.watching(read_through_the_gateway)
        guesser = {"x-forwarded-for": "203.0.113.7"}
        guesses = [unknown_key() for _ in range(3)]
        http_codes = [
            (await http.get("/api/v1/user/me", headers={**guesser, "x-api-key": key})).status_code
            for _, key in guesses
        ]
        late_id, late_key = unknown_key()
        late = await http.get("/api/v1/user/me", headers={**guesser, "x-api-key": late_key})
        valid = await http.get("/api/v1/user/me", headers={**guesser, "x-api-key": system.api_key})

        jwt_guesser = (("x-forwarded-for", "203.0.113.8"),)
        grpc_codes = [
            (
                await grpc_status(
                    system, "Ping", PING, (*jwt_guesser, ("authorization", f"Bearer e30.{n}.x"))
                )
            )[0]
            for n in range(3)
        ]
        limited = await grpc_status(
            system, "Ping", PING, (*jwt_guesser, ("x-api-key", system.api_key))
        )
        other = (("x-forwarded-for", "203.0.113.9"), ("x-api-key", system.api_key))
        elsewhere = await grpc_status(system, "Ping", PING, other)
        control_id, control_key = unknown_key()
        await http.get("/api/v1/user/me", headers={"x-api-key": control_key})
        await eventually(lambda: _at_least(reads.of(control_id), 1))

    assert http_codes == [401, 401, 401]
    assert [reads.of(public_id) for public_id, _ in guesses] == [1, 1, 1]
    for refused in (late, valid):
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert "did not check out came from this address" in refused.json()["error"]["message"]
    assert reads.of(late_id) == 0  # refused before its key was looked up

    assert grpc_codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
    code, details, trailing = limited
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "did not check out came from this address" in details
    assert 1 <= int(trailing["retry-after"]) <= 60
    assert elsewhere[0] is grpc.StatusCode.OK  # the limit is the guessing address's alone
