"""The one table from our error codes to gRPC statuses and HTTP answers."""

from __future__ import annotations

from typing import Any

import grpc

from schemas.errors import ErrorCode, GpuproxyError, IdempotencyKeyReused, PayloadTooLarge

STATUS: dict[ErrorCode, tuple[grpc.StatusCode, int]] = {
    ErrorCode.INVALID_ARGUMENT: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    ErrorCode.UNAUTHENTICATED: (grpc.StatusCode.UNAUTHENTICATED, 401),
    ErrorCode.PERMISSION_DENIED: (grpc.StatusCode.PERMISSION_DENIED, 403),
    ErrorCode.NOT_FOUND: (grpc.StatusCode.NOT_FOUND, 404),
    ErrorCode.ALREADY_EXISTS: (grpc.StatusCode.ALREADY_EXISTS, 409),
    ErrorCode.FAILED_PRECONDITION: (grpc.StatusCode.FAILED_PRECONDITION, 412),
    ErrorCode.RESOURCE_EXHAUSTED: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    ErrorCode.CANCELLED: (grpc.StatusCode.CANCELLED, 499),
    ErrorCode.DEADLINE_EXCEEDED: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ErrorCode.UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, 503),
    ErrorCode.UNIMPLEMENTED: (grpc.StatusCode.UNIMPLEMENTED, 501),
    ErrorCode.INTERNAL: (grpc.StatusCode.INTERNAL, 500),
}

HTTP_REFINED: tuple[tuple[type[GpuproxyError], int], ...] = (
    (PayloadTooLarge, 413),
    (IdempotencyKeyReused, 409),
)
"""HTTP tells apart what gRPC does not: too large (413) is not too many (429)."""

INTERNAL_MESSAGE = "the gateway failed unexpectedly; quote the error id when you report it"
"""All a client learns of an unexpected failure: the details stay in the gateway's log."""


def grpc_status(error: GpuproxyError) -> tuple[grpc.StatusCode, str]:
    code, _ = STATUS[error.code]
    message = f"{error.field}: {error.message}" if error.field else error.message
    return code, message


def http_answer(error: GpuproxyError) -> tuple[int, dict[str, Any]]:
    _, status = STATUS[error.code]
    status = next((s for cls, s in HTTP_REFINED if isinstance(error, cls)), status)
    body: dict[str, Any] = {"code": str(error.code), "message": error.message}
    if error.field:
        body["field"] = error.field
    return status, {"error": body}


def internal_answer(error_id: str) -> tuple[int, dict[str, Any]]:
    """The HTTP answer to an exception no one planned for."""
    body = {"code": str(ErrorCode.INTERNAL), "message": INTERNAL_MESSAGE, "error_id": error_id}
    return 500, {"error": body}


def internal_status(error_id: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of an exception no one planned for."""
    return grpc.StatusCode.INTERNAL, f"{INTERNAL_MESSAGE} (error id {error_id})"
