"""The simulated server's error answers, shaped as OpenAI's."""

from __future__ import annotations

from starlette.responses import JSONResponse

RETRY_AFTER = {503: "1", 429: "30"}
"""What an overloaded and a rate-limited machine ask the caller to wait, in seconds."""


class ApiError(Exception):
    """Answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }
        wait = RETRY_AFTER.get(self.status)
        headers = {"retry-after": wait} if wait else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def missing(field: str) -> ApiError:
    return ApiError(
        400,
        f"Missing required parameter: '{field}'.",
        param=field,
        code="missing_required_parameter",
    )


def throttled() -> ApiError:
    """What `FailMode.THROTTLE` answers."""
    return ApiError(
        429,
        "Rate limit reached for requests (simulated); retry after the time given.",
        code="rate_limit_exceeded",
    )


def overloaded() -> ApiError:
    """What `FailMode.REFUSE` answers."""
    return ApiError(
        503,
        "The server is overloaded (simulated); retry later or elsewhere.",
        code="service_unavailable",
    )
