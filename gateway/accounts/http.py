"""HTTP routes of accounts and access: auth, API keys, users (admin), address lists, export.

Every route is made through the guard with its requirement and the query parameters it
takes (any other is refused). `?user_id=` follows the one rule of `AccountService.acting_for`:
an admin acts on another existing account, anyone else only on their own. A resource named
by its id (a key, a list entry) that belongs to another account answers 404, as if absent.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.accounts.ip_access import LISTS, ConfigChange, IpAccess, NewEntry, aliased
from gateway.accounts.service import AccountService, KeyRequest, UserChange
from gateway.auth import addresses, principal
from gateway.auth.http_guard import HttpGuard, presented_by
from gateway.auth.policy import ADMIN, CREDENTIALS, SESSION, Requirement
from gateway.http_io import body, json_response
from gateway.http_query import Endpoint, only
from schemas.errors import InvalidArgument


class Credentials(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    email: str
    password: str


class RefreshBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    refresh_token: str


class CheckBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ip_address: str | None = None
    ip: str | None = None
    """The obvious name, accepted for `ip_address`."""


def _int_query(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument("must be a whole number", field=name) from None
    if not low <= value <= high:
        raise InvalidArgument(f"must be between {low} and {high}", field=name)
    return value


FOR_ACCOUNT = ("user_id",)
"""What a route about "your" things takes: an admin names another account with it."""


def routes(guard: HttpGuard, service: AccountService, ip_access: IpAccess) -> list[Route]:
    def public(path: str, endpoint: Endpoint) -> Route:
        return guard.route(path, only(endpoint), methods=["POST"], requirement=CREDENTIALS)

    def signed_in(
        path: str,
        endpoint: Endpoint,
        method: str,
        rule: Requirement = SESSION,
        *,
        params: tuple[str, ...] = (),
    ) -> Route:
        return guard.route(path, only(endpoint, params), methods=[method], requirement=rule)

    async def owner(request: Request) -> str:
        """The account a request acts on: the caller's, or `?user_id=` for an admin."""
        return await service.acting_for(
            principal.current(), request.query_params.get("user_id", "")
        )

    # --- public: sessions -----------------------------------------------------------------

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

    # --- API keys ---------------------------------------------------------------------------

    async def create_key(request: Request) -> Response:
        made = await service.create_key(principal.current(), await body(request, KeyRequest))
        answer = {"api_key": made.api_key, **msgspec.structs.asdict(made.info)}
        return json_response(201, answer)

    async def list_keys(request: Request) -> Response:
        keys = await service.keys_of(principal.current(), await owner(request))
        return json_response(200, {"api_keys": keys})

    async def revoke_key(request: Request) -> Response:
        revoked = await service.revoke_key(principal.current(), request.path_params["key_id"])
        return json_response(200, revoked)

    # --- the caller ---------------------------------------------------------------------------

    async def me(request: Request) -> Response:
        caller = principal.current()
        user = await service.user(caller, await owner(request))
        if user.id != caller.user_id:
            # An admin looking at another account: the credential fields describe the
            # admin's own credential, not that account's, so they are left out.
            return json_response(200, user)
        return json_response(
            200,
            {
                **msgspec.structs.asdict(user),
                "via": caller.via,
                "scopes": sorted(caller.scopes),
                "key_id": caller.key_id,
            },
        )

    async def export(request: Request) -> Response:
        account = await owner(request)
        data: dict[str, Any] = await service.export(principal.current(), account)
        data["ip_access"] = {
            "config": await ip_access.config(account),
            "allowlist": await ip_access.entries(account, "allow"),
            "denylist": await ip_access.entries(account, "deny"),
            "log": await ip_access.log(account, limit=1000),
        }
        return json_response(200, data)

    # --- users (admin) ----------------------------------------------------------------------

    async def list_users(request: Request) -> Response:
        limit = _int_query(request, "limit", 100, 1, 1000)
        offset = _int_query(request, "offset", 0, 0, 10**9)
        users, total = await service.users(principal.current(), limit=limit, offset=offset)
        return json_response(200, {"users": users, "total_count": total})

    async def get_user(request: Request) -> Response:
        return json_response(
            200, await service.user(principal.current(), request.path_params["user_id"])
        )

    async def update_user(request: Request) -> Response:
        change = await body(request, UserChange)
        updated = await service.update_user(
            principal.current(), request.path_params["user_id"], change
        )
        return json_response(200, updated)

    # --- address lists ----------------------------------------------------------------------

    async def get_config(request: Request) -> Response:
        return json_response(200, await ip_access.config(await owner(request)))

    async def put_config(request: Request) -> Response:
        change = await body(request, ConfigChange)
        address = guard.gatekeeper.address_of(presented_by(request))
        config = await ip_access.set_config(
            principal.current(), await owner(request), change, address
        )
        return json_response(200, config)

    def list_routes(which: str) -> list[Route]:
        async def entries(request: Request) -> Response:
            found = await ip_access.entries(await owner(request), which)
            return json_response(200, {"entries": found, "total_count": len(found)})

        async def add(request: Request) -> Response:
            new = await body(request, NewEntry)
            entry = await ip_access.add(principal.current(), await owner(request), which, new)
            return json_response(201, entry)

        async def remove(request: Request) -> Response:
            await ip_access.remove(principal.current(), which, request.path_params["entry_id"])
            return Response(status_code=204)

        base = f"/api/v1/ip-access/{which}list"
        return [
            signed_in(base, entries, "GET", params=FOR_ACCOUNT),
            signed_in(base, add, "POST", params=FOR_ACCOUNT),
            signed_in(f"{base}/{{entry_id}}", remove, "DELETE"),
        ]

    async def check(request: Request) -> Response:
        wanted = await body(request, CheckBody)
        text, field = aliased(wanted.ip_address, "ip_address", wanted.ip, "ip")
        if text is None:
            raise InvalidArgument("send the address to check", field="ip_address")
        address = addresses.parse_address(text, field=field)
        return json_response(200, await ip_access.check(await owner(request), address))

    async def access_log(request: Request) -> Response:
        limit = _int_query(request, "limit", 100, 1, 1000)
        found = await ip_access.log(await owner(request), limit=limit)
        return json_response(200, {"entries": found})

    return [
        public("/api/v1/auth/register", register),
        public("/api/v1/auth/login", login),
        public("/api/v1/auth/refresh", refresh),
        public("/api/v1/auth/logout", logout),
        # A key is minted by its own account only: no `user_id` here.
        signed_in("/api/v1/auth/apikey", create_key, "POST"),
        signed_in("/api/v1/auth/apikeys", list_keys, "GET", params=FOR_ACCOUNT),
        signed_in("/api/v1/auth/apikeys/{key_id}", revoke_key, "DELETE"),
        signed_in("/api/v1/user/me", me, "GET", Requirement(), params=FOR_ACCOUNT),
        signed_in("/api/v1/user/export", export, "GET", params=FOR_ACCOUNT),
        signed_in("/api/v1/admin/users", list_users, "GET", ADMIN, params=("limit", "offset")),
        signed_in("/api/v1/admin/users/{user_id}", get_user, "GET", ADMIN),
        signed_in("/api/v1/admin/users/{user_id}", update_user, "PATCH", ADMIN),
        signed_in("/api/v1/ip-access/config", get_config, "GET", params=FOR_ACCOUNT),
        signed_in("/api/v1/ip-access/config", put_config, "PUT", params=FOR_ACCOUNT),
        *(route for which in LISTS for route in list_routes(which)),
        signed_in("/api/v1/ip-access/check", check, "POST", params=FOR_ACCOUNT),
        signed_in("/api/v1/ip-access/log", access_log, "GET", params=(*FOR_ACCOUNT, "limit")),
    ]
