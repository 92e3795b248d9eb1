"""Error codes that cross the bus and the one exception hierarchy built on them.

A worker raises one of these; the bus carries its `ErrorInfo`; the gateway rebuilds the same
exception with `error_from_info` and maps its code to a gRPC status and an HTTP status in one
table. Messages are written for the caller and must never contain a secret.
"""

from __future__ import annotations

import enum

import msgspec


class ErrorCode(enum.StrEnum):
    """What went wrong, in the vocabulary shared by gRPC statuses and HTTP answers."""

    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An error as it travels on the bus."""

    code: ErrorCode
    message: str
    field: str = ""
    """The request field at fault, when one is."""
    retriable: bool = False


class GpuproxyError(Exception):
    """Base of every error the project raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL
    retriable: bool = False

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def headers(self) -> dict[str, str]:
        """Extra answer headers (HTTP) or trailing metadata (gRPC), e.g. `Retry-After`."""
        return {}

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(
            code=self.code, message=self.message, field=self.field, retriable=self.retriable
        )


class InvalidArgument(GpuproxyError, ValueError):
    code = ErrorCode.INVALID_ARGUMENT


class Unauthenticated(GpuproxyError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(GpuproxyError):
    code = ErrorCode.PERMISSION_DENIED


class NotFound(GpuproxyError, LookupError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(GpuproxyError):
    code = ErrorCode.ALREADY_EXISTS


class FailedPrecondition(GpuproxyError):
    code = ErrorCode.FAILED_PRECONDITION


class IdempotencyKeyReused(FailedPrecondition):
    """The key was first used with another method or another request body. Payment APIs
    answer this as a conflict (HTTP 409); an answer to the other request would be wrong.
    Raised by the gateway itself, so it never needs a code of its own on the bus."""


class ResourceExhausted(GpuproxyError):
    code = ErrorCode.RESOURCE_EXHAUSTED
    retriable = True


class PayloadTooLarge(ResourceExhausted):
    """A request, or the command made of it, larger than a limit it must fit in (HTTP 413);
    the message names the limit. Sending the same again cannot succeed."""

    retriable = False


class Cancelled(GpuproxyError):
    code = ErrorCode.CANCELLED


class DeadlineExceeded(GpuproxyError, TimeoutError):
    code = ErrorCode.DEADLINE_EXCEEDED
    retriable = True


class Unavailable(GpuproxyError, ConnectionError):
    code = ErrorCode.UNAVAILABLE
    retriable = True


class Unimplemented(GpuproxyError):
    """A call this deployment does not serve; the message names what is missing."""

    code = ErrorCode.UNIMPLEMENTED


class Internal(GpuproxyError):
    code = ErrorCode.INTERNAL


class ConfigError(GpuproxyError, ValueError):
    """A setting is wrong; `field` names the environment variable or option."""

    code = ErrorCode.INVALID_ARGUMENT


class RetryLater(GpuproxyError):
    """Raised by a command handler: put the command back and deliver it again after `delay`."""

    code = ErrorCode.UNAVAILABLE
    retriable = True

    def __init__(self, message: str, *, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class Reject(GpuproxyError):
    """Raised by a command handler: the command can never succeed; answer `error`, drop it,
    and record it as dead-lettered."""

    def __init__(self, error: GpuproxyError) -> None:
        super().__init__(error.message, field=error.field)
        self.error = error
        self.code = error.code


def error_from_info(info: ErrorInfo) -> GpuproxyError:
    """Rebuild the exception a worker raised from what the bus carried."""
    match info.code:
        case ErrorCode.INVALID_ARGUMENT:
            cls: type[GpuproxyError] = InvalidArgument
        case ErrorCode.UNAUTHENTICATED:
            cls = Unauthenticated
        case ErrorCode.PERMISSION_DENIED:
            cls = PermissionDenied
        case ErrorCode.NOT_FOUND:
            cls = NotFound
        case ErrorCode.ALREADY_EXISTS:
            cls = AlreadyExists
        case ErrorCode.FAILED_PRECONDITION:
            cls = FailedPrecondition
        case ErrorCode.RESOURCE_EXHAUSTED:
            cls = ResourceExhausted
        case ErrorCode.CANCELLED:
            cls = Cancelled
        case ErrorCode.DEADLINE_EXCEEDED:
            cls = DeadlineExceeded
        case ErrorCode.UNAVAILABLE:
            cls = Unavailable
        case ErrorCode.UNIMPLEMENTED:
            cls = Unimplemented
        case ErrorCode.INTERNAL:
            cls = Internal
    return cls(info.message, field=info.field)
