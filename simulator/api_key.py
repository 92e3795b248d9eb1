"""The simulated server's API key: `/v1/*` asks for it, as a key-protected vLLM does.

`/health` and `/sim/stats` stay open, so a supervisor and a test can see the machine without
the key. A refusal is OpenAI's 401 and names neither the presented key nor the expected one.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from simulator.errors import ApiError


def invalid_api_key() -> ApiError:
    return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


def _guarded(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class ApiKeyGate:
    """ASGI middleware: `Authorization: Bearer <key>` or 401 on the OpenAI routes."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode()

    def _admits(self, scope: Scope) -> bool:
        scheme, _, presented = Headers(scope=scope).get("authorization", "").partition(" ")
        # Compared in constant time, so the answer's timing leaks no prefix of the key.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), self._key
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self._key
            and scope["type"] == "http"
            and _guarded(scope["path"])
            and not self._admits(scope)
        ):
            response = invalid_api_key().response()
            response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
