"""The simulated server's error answers, shaped as OpenAI's."""

from __future__ import annotations

from starlette.responses import JSONResponse


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
        headers = {"retry-after": "1"} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def missing(field: str) -> ApiError:
    return ApiError(
        400,
        f"Missing required parameter: '{field}'.",
        param=field,
        code="missing_required_parameter",
    )


def overloaded() -> ApiError:
    """What `FailMode.REFUSE` answers."""
    return ApiError(
        503,
        "The server is overloaded (simulated); retry later or elsewhere.",
        code="service_unavailable",
    )
