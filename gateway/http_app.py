"""The HTTP front door: a Starlette app with JSON errors that name the field at fault."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bus.caller import CommandCaller
from gateway import validation
from gateway.config import GatewayConfig
from gateway.errors import http_answer
from gateway.health import Health
from schemas.commands import Ping
from schemas.errors import GpuproxyError, InvalidArgument
from schemas.replies import Pong

IDEMPOTENCY_KEY = "Idempotency-Key"


class PingBody(msgspec.Struct, forbid_unknown_fields=True):
    message: str = ""
    worker_kind: str = ""
    delay_ms: int = 0


def _json(status: int, body: Any) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def _field_of(text: str) -> tuple[str, str]:
    """Split msgspec's "Expected `int`, got `str` - at `$.delay_ms`" into message and field."""
    path = _PATH.search(text)
    message = text[: path.start()] if path else text
    field = path.group(1) if path else ""
    if unknown := _UNKNOWN.search(message):
        field = ".".join(p for p in (field, unknown.group(1)) if p)
    return message, field


def _decode(raw: bytes, type_: type[Any]) -> Any:
    try:
        return msgspec.json.decode(raw or b"{}", type=type_)
    except msgspec.ValidationError as exc:
        message, field = _field_of(str(exc))
        raise InvalidArgument(message, field=field) from None
    except msgspec.DecodeError:
        raise InvalidArgument("the body is not valid JSON", field="body") from None


def build_app(caller: CommandCaller, health: Health, config: GatewayConfig) -> Starlette:
    async def live(request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def ready(request: Request) -> Response:
        report = await health.report()
        status = "ready" if report.healthy else "not ready"
        return _json(200 if report.healthy else 503, {"status": status, "details": report.details})

    async def health_report(request: Request) -> Response:
        report = await health.report()
        body = {"status": "healthy" if report.healthy else "degraded", "details": report.details}
        return _json(200 if report.healthy else 503, body)

    async def ping(request: Request) -> Response:
        body: PingBody = _decode(await request.body(), PingBody)
        command_id = validation.command_id(
            request.headers.get(IDEMPOTENCY_KEY), field=IDEMPOTENCY_KEY
        )
        kind = validation.worker_kind(body.worker_kind)
        command = Ping(
            command_id=command_id,
            message=validation.ping_message(body.message),
            delay_ms=validation.ping_delay(body.delay_ms),
        )
        reply = await caller.call(kind, command, timeout=config.request_timeout)
        assert isinstance(reply, Pong)
        return _json(200, msgspec.structs.asdict(reply))

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GpuproxyError)
        status, body = http_answer(exc)
        return _json(status, body)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json(exc.status_code, {"error": {"code": "http", "message": exc.detail}})

    return Starlette(
        routes=[
            Route("/health", health_report, methods=["GET"]),
            Route("/healthz", live, methods=["GET"]),
            Route("/readyz", ready, methods=["GET"]),
            Route("/api/v1/ping", ping, methods=["POST"]),
        ],
        exception_handlers={GpuproxyError: on_error, HTTPException: on_http_error},
    )
