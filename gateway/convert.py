"""Protobuf <-> bus messages, in one place: nothing behind the gateway sees protobuf."""

from __future__ import annotations

import time

from gateway import validation
from gateway.health import HealthReport
from gateway.pb import gpuproxy_pb2 as pb
from schemas.commands import Ping
from schemas.replies import Pong
from schemas.subjects import WorkerKind


def ping_from_proto(
    request: pb.PingRequest, *, command_id: str, actor: str = ""
) -> tuple[WorkerKind, Ping]:
    kind = validation.worker_kind(request.worker_kind)
    command = Ping(
        command_id=command_id,
        actor=actor,
        issued_at_ms=int(time.time() * 1000),
        message=validation.ping_message(request.message),
        delay_ms=validation.ping_delay(request.delay_ms),
    )
    return kind, command


def pong_to_proto(pong: Pong) -> pb.PingResponse:
    return pb.PingResponse(
        message=pong.message,
        worker_kind=pong.worker_kind,
        worker_id=pong.worker_id,
        attempt=pong.attempt,
    )


def health_to_proto(report: HealthReport) -> pb.HealthCheckResponse:
    return pb.HealthCheckResponse(
        status=report.status,
        timestamp=report.checked_at_ms // 1000,
        details=report.details,
    )
