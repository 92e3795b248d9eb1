"""JSON in and out of the HTTP front door; a bad body names the field at fault."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from schemas.errors import InvalidArgument

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
