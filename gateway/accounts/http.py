"""HTTP routes of accounts: /api/v1/auth/register, login, refresh, logout (public routes)."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.accounts.service import AccountService
from gateway.http_io import body, json_response


class Credentials(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    email: str
    password: str


class RefreshBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    refresh_token: str


def routes(service: AccountService) -> list[Route]:
    async def register(request: Request) -> Response:
        credentials = await body(request, Credentials)
        user_id, email = await service.register(credentials.email, credentials.password)
        return json_response(201, {"user_id": user_id, "email": email})

    async def login(request: Request) -> Response:
        credentials = await body(request, Credentials)
        return json_response(200, await service.login(credentials.email, credentials.password))

    async def refresh(request: Request) -> Response:
        presented = await body(request, RefreshBody)
        return json_response(200, await service.refresh(presented.refresh_token))

    async def logout(request: Request) -> Response:
        presented = await body(request, RefreshBody)
        await service.logout(presented.refresh_token)
        return Response(status_code=204)

    return [
        Route("/api/v1/auth/register", register, methods=["POST"]),
        Route("/api/v1/auth/login", login, methods=["POST"]),
        Route("/api/v1/auth/refresh", refresh, methods=["POST"]),
        Route("/api/v1/auth/logout", logout, methods=["POST"]),
    ]
