"""`?user_id=` means the same on every route about "your" things: an admin acts on another
existing account, an unknown account is 404, someone else's account is 403 for anyone but an
admin, and one's own id is the same as leaving it out. Both front doors."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from gateway.pb import gpuproxy_pb2 as pb
from tests.e2e.access_client import User, grpc_status
from tests.e2e.system import System

NOBODY = "0" * 32

# (method, path, body): every HTTP route that takes `user_id`.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/v1/auth/apikeys", None),
    ("GET", "/api/v1/user/me", None),
    ("GET", "/api/v1/user/export", None),
    ("GET", "/api/v1/ip-access/config", None),
    ("PUT", "/api/v1/ip-access/config", {"audit_log_enabled": True}),
    ("GET", "/api/v1/ip-access/allowlist", None),
    ("POST", "/api/v1/ip-access/allowlist", {"ip_range": "10.0.0.0/8"}),
    ("GET", "/api/v1/ip-access/denylist", None),
    ("POST", "/api/v1/ip-access/denylist", {"ip_address": "192.0.2.7"}),
    ("POST", "/api/v1/ip-access/check", {"ip_address": "192.0.2.7"}),
    ("GET", "/api/v1/ip-access/log", None),
    ("GET", "/api/v1/gpu/instances/mine", None),
    ("GET", "/api/v1/gpu/reservations", None),
    ("GET", "/api/v1/gpu/preferences", None),
    ("POST", "/api/v1/gpu/preferences", {"min_vram": 24}),
]


async def call(
    user: User, route: tuple[str, str, dict[str, Any] | None], user_id: str
) -> httpx.Response:
    method, path, body = route
    return await user.call(method, path, params={"user_id": user_id}, json=body)


async def test_user_id_follows_one_rule_on_every_route(
    system: System, http: httpx.AsyncClient
) -> None:
    admin = await User.operator(http, system)
    ada, bob = await User.signed_up(http, system), await User.signed_up(http, system)
    for route in ROUTES:
        for_ada = await call(admin, route, ada.user_id)
        assert for_ada.status_code in (200, 201), (route, for_ada.text)

        unknown = await call(admin, route, NOBODY)
        assert unknown.status_code == 404, (route, unknown.text)
        assert unknown.json()["error"]["field"] == "user_id", route

        someone_else = await call(bob, route, ada.user_id)
        assert someone_else.status_code == 403, (route, someone_else.text)
        assert someone_else.json()["error"]["field"] == "user_id", route
        # The same answer whether the account exists: a non-admin cannot probe ids.
        assert (await call(bob, route, NOBODY)).status_code == 403, route

        own = await call(bob, route, bob.user_id)
        assert own.status_code in (200, 201), (route, own.text)


async def test_an_admin_with_user_id_sees_that_accounts_things(
    system: System, http: httpx.AsyncClient
) -> None:
    admin = await User.operator(http, system)
    ada = await User.signed_up(http, system)
    key = await ada.make_key(name="ada's")
    listed = await ada.call("POST", "/api/v1/ip-access/allowlist", json={"ip_range": "10.0.0.0/8"})
    assert listed.status_code == 201, listed.text
    as_ada = {"user_id": ada.user_id}

    me = (await admin.call("GET", "/api/v1/user/me", params=as_ada)).json()
    assert (me["id"], me["email"]) == (ada.user_id, ada.email)
    assert "scopes" not in me, "the admin's own credential is not ada's"
    own = (await admin.call("GET", "/api/v1/user/me")).json()
    assert own["id"] == admin.user_id
    assert "admin" in own["scopes"]

    keys = (await admin.call("GET", "/api/v1/auth/apikeys", params=as_ada)).json()
    assert [k["id"] for k in keys["api_keys"]] == [key["id"]]
    export = (await admin.call("GET", "/api/v1/user/export", params=as_ada)).json()
    assert export["user"]["id"] == ada.user_id
    assert [e["ip_range"] for e in export["ip_access"]["allowlist"]] == ["10.0.0.0/8"]

    saved = await admin.call(
        "POST", "/api/v1/gpu/preferences", params=as_ada, json={"min_vram": 48}
    )
    assert saved.status_code == 200, saved.text
    mine = (await ada.call("GET", "/api/v1/gpu/preferences")).json()
    assert mine["preferences"]["min_vram_gb"] == 48
    assert (await admin.call("GET", "/api/v1/gpu/preferences")).json()["preferences"] == {}


async def test_all_lists_every_account_for_an_admin_only(
    system: System, http: httpx.AsyncClient
) -> None:
    admin = await User.operator(http, system)
    ada = await User.signed_up(http, system)
    for path in ("/api/v1/gpu/instances/mine", "/api/v1/gpu/reservations"):
        assert (await admin.call("GET", path, params={"user_id": "all"})).status_code == 200
        refused = await ada.call("GET", path, params={"user_id": "all"})
        assert refused.status_code == 403
        assert refused.json()["error"]["field"] == "user_id"
    # `all` is a list of accounts' instances, not an account whose keys one could list.
    keys = await admin.call("GET", "/api/v1/auth/apikeys", params={"user_id": "all"})
    assert keys.status_code == 404


@pytest.mark.parametrize(
    "request_type", [pb.ListOwnedGPUInstancesRequest, pb.ListReservationsRequest]
)
async def test_grpc_lists_follow_the_same_rule(
    system: System, http: httpx.AsyncClient, request_type: Any
) -> None:
    method = (
        "ListOwnedGPUInstances"
        if request_type is pb.ListOwnedGPUInstancesRequest
        else "ListReservations"
    )
    admin = await User.operator(http, system)
    ada, bob = await User.signed_up(http, system), await User.signed_up(http, system)

    def bearer(user: User) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {user.token}"),)

    cases = [
        (admin, ada.user_id, grpc.StatusCode.OK),
        (admin, "all", grpc.StatusCode.OK),
        (admin, NOBODY, grpc.StatusCode.NOT_FOUND),
        (bob, ada.user_id, grpc.StatusCode.PERMISSION_DENIED),
        (bob, NOBODY, grpc.StatusCode.PERMISSION_DENIED),
        (bob, bob.user_id, grpc.StatusCode.OK),
        (bob, "", grpc.StatusCode.OK),
    ]
    for caller, user_id, expected in cases:
        code, details, _ = await grpc_status(
            system, method, request_type(user_id=user_id), bearer(caller)
        )
        assert code is expected, (method, user_id, details)
        if expected is not grpc.StatusCode.OK:
            assert details.startswith("user_id:"), details
