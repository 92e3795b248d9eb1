"""The HTTP front door: a Starlette app with JSON errors that name the field at fault."""

from __future__ import annotations

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from bus.caller import CommandCaller
from gateway import validation
from gateway.accounts.http import routes as account_routes
from gateway.accounts.ip_access import IpAccess
from gateway.accounts.service import AccountService
from gateway.auth import principal
from gateway.auth.http_guard import HttpGuard
from gateway.auth.policy import PUBLIC, SIGNED_IN
from gateway.config import GatewayConfig
from gateway.errors import answer_for
from gateway.gpus.http import routes as gpu_routes
from gateway.gpus.preferences import PreferenceStore
from gateway.gpus.service import GpuService
from gateway.health import Health
from gateway.http_io import body, json_response
from gateway.http_query import only
from gateway.inference.balancing import Balancing
from gateway.inference.balancing import routes as balancing_routes
from gateway.inference.http import routes as inference_routes
from gateway.inference.legacy import routes as legacy_routes
from gateway.unexpected import UnexpectedHttpErrors
from schemas.commands import Ping
from schemas.errors import GpuproxyError
from schemas.replies import Pong

IDEMPOTENCY_KEY = "Idempotency-Key"


class PingBody(msgspec.Struct, forbid_unknown_fields=True):
    message: str = ""
    worker_kind: str = ""
    delay_ms: int = 0


def build_app(
    caller: CommandCaller,
    health: Health,
    guard: HttpGuard,
    accounts: AccountService,
    ip_access: IpAccess,
    config: GatewayConfig,
    gpus: GpuService,
    preferences: PreferenceStore,
) -> Starlette:
    async def live(request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def ready(request: Request) -> Response:
        readiness = await health.readiness()
        status = "ready" if readiness.ready else "not ready"
        return json_response(
            200 if readiness.ready else 503, {"status": status, "details": readiness.details}
        )

    async def health_report(request: Request) -> Response:
        # A status page, not a gate: 503 only when this gateway itself cannot take calls.
        report = await health.report()
        body = {
            "status": report.status,
            "checked_at_ms": report.checked_at_ms,
            "details": report.details,
            "workers": report.workers,
        }
        return json_response(200 if report.ready else 503, body)

    async def ping(request: Request) -> Response:
        ping_body = await body(request, PingBody)
        actor = principal.current().user_id
        command_id = validation.command_id(
            request.headers.get(IDEMPOTENCY_KEY), field=IDEMPOTENCY_KEY, owner=actor
        )
        kind = validation.worker_kind(ping_body.worker_kind)
        command = Ping(
            command_id=command_id,
            actor=actor,
            message=validation.ping_message(ping_body.message),
            delay_ms=validation.ping_delay(ping_body.delay_ms),
        )
        reply = await caller.call(kind, command, timeout=config.request_timeout)
        assert isinstance(reply, Pong)
        return json_response(200, msgspec.structs.asdict(reply))

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GpuproxyError)
        status, body = answer_for(request.url.path, exc)
        response = json_response(status, body)
        response.headers.update(exc.headers())
        return response

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return json_response(exc.status_code, {"error": {"code": "http", "message": exc.detail}})

    return Starlette(
        routes=[
            # The data plane first: Starlette tries routes in order, and inference is most
            # of the traffic.
            *inference_routes(guard, caller, config),
            guard.route("/health", health_report, methods=["GET"], requirement=PUBLIC),
            guard.route("/healthz", live, methods=["GET"], requirement=PUBLIC),
            guard.route("/readyz", ready, methods=["GET"], requirement=PUBLIC),
            guard.route("/api/v1/ping", only(ping), methods=["POST"], requirement=SIGNED_IN),
            *account_routes(guard, accounts, ip_access),
            *gpu_routes(guard, gpus, preferences, accounts),
            *legacy_routes(guard, caller, config),
            *balancing_routes(guard, Balancing(caller, config), accounts),
        ],
        exception_handlers={GpuproxyError: on_error, HTTPException: on_http_error},
        # Inside Starlette's own error middleware, which would answer a bare text 500.
        middleware=[Middleware(UnexpectedHttpErrors)],
    )
