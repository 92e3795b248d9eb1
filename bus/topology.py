"""Declaring streams, consumers and KV buckets from their `schemas.topology` specs.

Every process declares what it uses at start. Declaring is idempotent: an existing stream is
updated to the spec, so changing a spec and restarting rolls it out.

On a cluster a declaration can meet a moment without a leader (the cluster forming, a node
lost, a stream just created by another process and not yet placed): the answer is a
timeout, "no responders" or a stream not found right after it was said to exist. Those are
asked again for up to `DECLARE_SECONDS`, so a process starting beside a busy cluster waits
for it instead of failing its start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from schemas.errors import Unavailable
from schemas.topology import ConsumerSpec, KeyValueSpec, StreamSpec

log = logging.getLogger("gpuproxy.bus")

_CONSUMER_EXISTS = 10148
"""JetStream's error code for a create-only consumer request whose consumer exists."""


DECLARE_SECONDS = 60.0

T = TypeVar("T")


async def _patiently(what: str, declare: Callable[[], Awaitable[T]]) -> T:
    give_up = time.monotonic() + DECLARE_SECONDS
    pause = 0.1
    while True:
        try:
            return await declare()
        except (
            NotFoundError,
            BadRequestError,
            NatsTimeout,
            NoRespondersError,
            ServiceUnavailableError,
        ) as exc:
            if time.monotonic() + pause > give_up:
                raise Unavailable(f"cannot declare {what}: {type(exc).__name__}") from None
            log.info("declaring %s: %s; asking again", what, type(exc).__name__)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


def _stream_config(spec: StreamSpec) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=RetentionPolicy(spec.retention),
        storage=StorageType.FILE,
        max_age=spec.max_age_seconds,
        duplicate_window=spec.duplicate_window_seconds,
        num_replicas=spec.replicas,
    )


async def declare_stream(js: JetStreamContext, spec: StreamSpec) -> None:
    await _patiently(f"the stream {spec.name}", lambda: _declare_stream(js, spec))


async def _declare_stream(js: JetStreamContext, spec: StreamSpec) -> None:
    config = _stream_config(spec)
    try:
        await js.stream_info(spec.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except BadRequestError:
            # Another process created it between our look and our add.
            pass
    await js.update_stream(config)


async def declare_consumer(nc: Client, spec: ConsumerSpec) -> ConsumerConfig:
    return await _patiently(f"the consumer {spec.durable}", lambda: _declare_consumer(nc, spec))


async def _declare_consumer(nc: Client, spec: ConsumerSpec) -> ConsumerConfig:
    """Create the durable consumer, or take the one that is there; returns its actual config.

    Replicas may run with different settings (a rolling change of `GPUPROXY_ACK_WAIT`); were
    each to write its own value, they would rewrite the shared consumer back and forth and
    each keep-alive would follow a value that is not in force. So the first declaration wins
    for the ack wait, every replica reads back what is there, and only what is fixed by this
    version (the filter, unlimited redelivery) is brought into line.
    """
    js = nc.jetstream()
    wanted = ConsumerConfig(
        durable_name=spec.durable,
        filter_subject=spec.filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=spec.ack_wait_seconds,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        max_waiting=512,
    )
    for _ in range(3):
        try:
            existing: ConsumerConfig = (await js.consumer_info(spec.stream, spec.durable)).config
        except NotFoundError:
            created = await _create_only(nc, spec, wanted)
            if created is not None:
                return created
            continue  # another replica created it meanwhile: take theirs
        if (existing.max_deliver or -1) == spec.max_deliver and (
            existing.filter_subject == spec.filter_subject
        ):
            return existing
        if existing.ack_wait is not None:
            wanted.ack_wait = existing.ack_wait
        log.info("consumer %s: bringing redelivery and filter in line", spec.durable)
        updated: ConsumerConfig = (await js.add_consumer(spec.stream, wanted)).config
        return updated
    raise Unavailable(f"cannot declare the consumer {spec.durable}")


async def _create_only(
    nc: Client, spec: ConsumerSpec, config: ConsumerConfig
) -> ConsumerConfig | None:
    """Create the consumer unless it exists (JetStream's `action: create`, which nats-py's
    `add_consumer` does not expose); None when another process was first."""
    subject = f"$JS.API.CONSUMER.CREATE.{spec.stream}.{spec.durable}.{spec.filter_subject}"
    request = {"stream_name": spec.stream, "config": config.as_dict(), "action": "create"}
    answer = json.loads((await nc.request(subject, json.dumps(request).encode(), 5.0)).data)
    error = answer.get("error")
    if error is None:
        created: ConsumerConfig = ConsumerInfo.from_response(answer).config
        return created
    if error.get("err_code") == _CONSUMER_EXISTS:
        return None
    raise Unavailable(f"cannot create the consumer {spec.durable}: {error.get('description')}")


async def declare_bucket(js: JetStreamContext, spec: KeyValueSpec) -> KeyValue:
    return await _patiently(f"the bucket {spec.bucket}", lambda: _declare_bucket(js, spec))


async def _declare_bucket(js: JetStreamContext, spec: KeyValueSpec) -> KeyValue:
    try:
        return await js.key_value(spec.bucket)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            KeyValueConfig(
                bucket=spec.bucket,
                history=spec.history,
                ttl=spec.ttl_seconds,
                storage=StorageType.FILE,
                replicas=spec.replicas,
            )
        )
    except BadRequestError:
        return await js.key_value(spec.bucket)
