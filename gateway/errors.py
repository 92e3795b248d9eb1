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


OPENAI_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    412: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
"""OpenAI's error `type` by HTTP status; any other status is a `server_error`."""

OPENAI_PREFIX = "/v1/"
"""Paths under it answer errors as OpenAI does, so its SDKs read them."""


def openai_error(error: GpuproxyError) -> dict[str, Any]:
    """An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""
    status, _ = http_answer(error)
    code = "model_not_found" if status == 404 and error.field == "model" else str(error.code)
    return {
        "error": {
            "message": error.message,
            "type": OPENAI_TYPES.get(status, "server_error"),
            "param": error.field or None,
            "code": code,
        }
    }


def answer_for(path: str, error: GpuproxyError) -> tuple[int, dict[str, Any]]:
    """The HTTP answer to an error on `path`: OpenAI's shape under `/v1/`, ours elsewhere."""
    status, body = http_answer(error)
    if path.startswith(OPENAI_PREFIX):
        return status, openai_error(error)
    return status, body


def internal_answer(error_id: str) -> tuple[int, dict[str, Any]]:
    """The HTTP answer to an exception no one planned for."""
    body = {"code": str(ErrorCode.INTERNAL), "message": INTERNAL_MESSAGE, "error_id": error_id}
    return 500, {"error": body}


def internal_status(error_id: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of an exception no one planned for."""
    return grpc.StatusCode.INTERNAL, f"{INTERNAL_MESSAGE} (error id {error_id})"
