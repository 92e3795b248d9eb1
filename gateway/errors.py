"""The one table from our error codes to gRPC statuses and HTTP answers."""

from __future__ import annotations

from typing import Any

import grpc

from schemas.errors import ErrorCode, GpuproxyError

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


def grpc_status(error: GpuproxyError) -> tuple[grpc.StatusCode, str]:
    code, _ = STATUS[error.code]
    message = f"{error.field}: {error.message}" if error.field else error.message
    return code, message


def http_answer(error: GpuproxyError) -> tuple[int, dict[str, Any]]:
    _, status = STATUS[error.code]
    body: dict[str, Any] = {"code": str(error.code), "message": error.message}
    if error.field:
        body["field"] = error.field
    return status, {"error": body}
