"""Declaring streams, consumers and KV buckets from their `schemas.topology` specs.

Every process declares what it uses at start. Declaring is idempotent: an existing stream or
consumer is updated to the spec, so changing a spec and restarting rolls it out.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from schemas.topology import ConsumerSpec, KeyValueSpec, StreamSpec

log = logging.getLogger("gpuproxy.bus")


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


async def declare_consumer(js: JetStreamContext, spec: ConsumerSpec) -> None:
    config = ConsumerConfig(
        durable_name=spec.durable,
        filter_subject=spec.filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=spec.ack_wait_seconds,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        max_waiting=512,
    )
    # The server creates the consumer, or updates the editable fields of an existing one.
    await js.add_consumer(spec.stream, config)


async def declare_bucket(js: JetStreamContext, spec: KeyValueSpec) -> KeyValue:
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
