"""JSON in and out of the HTTP front door; a bad body names the field at fault, and no body
is read past `GPUPROXY_MAX_BODY_BYTES`."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import answer_for
from schemas.errors import InvalidArgument, PayloadTooLarge

T = TypeVar("T")

_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN = re.compile(r"(?:unknown|missing required) field `([^`]+)`")


def json_response(status: int, body: Any) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def field_of(text: str) -> tuple[str, str]:
    """Split msgspec's "Expected `int`, got `str` - at `$.delay_ms`" into message and field."""
    path = _PATH.search(text)
    message = text[: path.start()] if path else text
    field = path.group(1) if path else ""
    if unknown := _UNKNOWN.search(message):
        field = ".".join(p for p in (field, unknown.group(1)) if p)
    return message, field


def decode(raw: bytes, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(raw or b"{}", type=type_)
    except msgspec.ValidationError as exc:
        message, field = field_of(str(exc))
        raise InvalidArgument(message, field=field) from None
    except msgspec.DecodeError:
        raise InvalidArgument("the body is not valid JSON", field="body") from None


async def body(request: Request, type_: type[T]) -> T:
    return decode(await request.body(), type_)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body is larger than {limit} bytes, the most this gateway reads "
        "(GPUPROXY_MAX_BODY_BYTES)",
        field="body",
    )


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses a malformed length before we run
    return None


class BodyLimit:
    """ASGI middleware: every read of a request body, by any route, stops at `limit` bytes.

    A declared Content-Length over the limit is answered 413 before a byte of the body is
    read; a body sent without one (chunked) raises `PayloadTooLarge` from the read that
    passes the limit, which the app answers 413 like any error of ours.
    """

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.limit:
            status, answer = answer_for(scope["path"], too_large(self.limit))
            await json_response(status, answer)(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large(self.limit)
            return message

        await self.app(scope, bounded, send)
