"""Who may do what, through the front doors, on SQLite and on PostgreSQL: API keys, scopes,
escalation attempts, tenancy, roles, disabling, logout, rate limits and address lists."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from tests.e2e.access_client import (
    User,
    clear_of_a_new_minute,
    eventually,
    grpc_ping,
    grpc_status,
)
from tests.e2e.system import System, running_system


@pytest.fixture
async def system(nats_url: str, any_database: str) -> AsyncIterator[System]:
    async with running_system(nats_url, any_database) as running:
        yield running


@pytest.fixture
def admin(system: System) -> dict[str, str]:
    return {"x-api-key": system.api_key}


# --- API keys ------------------------------------------------------------------------------


async def test_a_key_is_shown_once_kept_as_a_digest_and_works_on_both_doors(
    http: httpx.AsyncClient, system: System, any_database: str
) -> None:
    ada = await User.signed_up(http, system)
    made = await ada.make_key(name="laptop", scopes=["inference"], expires_in_days=30)
    key = made["api_key"]
    assert key.startswith(f"gpuproxy_{made['id']}_")
    assert made["scopes"] == ["inference"]
    assert made["expires_at_ms"] > time.time() * 1000

    listed = (await ada.call("GET", "/api/v1/auth/apikeys")).json()["api_keys"]
    assert [k["id"] for k in listed] == [made["id"]]
    assert "api_key" not in listed[0]
    assert key.rsplit("_", 1)[1] not in str(listed)

    for headers in ({"x-api-key": key}, {"authorization": f"Bearer {key}"}):
        me = await ada.call("GET", "/api/v1/user/me", headers=headers)
        assert me.status_code == 200, me.text
        assert (me.json()["id"], me.json()["via"], me.json()["key_id"]) == (
            ada.user_id,
            "api_key",
            made["id"],
        )
    assert (await grpc_ping(system, (("x-api-key", key),))).message == "hi"

    async def last_use_recorded() -> bool:
        keys = (await ada.call("GET", "/api/v1/auth/apikeys")).json()["api_keys"]
        return keys[0]["last_used_at_ms"] is not None

    await eventually(last_use_recorded)

    engine = create_async_engine(any_database)
    async with engine.connect() as db:
        rows = (await db.execute(text("SELECT * FROM api_keys"))).all()
    await engine.dispose()
    assert key.rsplit("_", 1)[1] not in repr(rows)


async def test_a_revoked_key_is_refused_and_says_so(
    http: httpx.AsyncClient, system: System
) -> None:
    ada = await User.signed_up(http, system)
    made = await ada.make_key()
    gone = await ada.call("DELETE", f"/api/v1/auth/apikeys/{made['id']}")
    assert gone.status_code == 200
    assert gone.json()["revoked_at_ms"] is not None
    answer = await ada.call("GET", "/api/v1/user/me", headers={"x-api-key": made["api_key"]})
    assert answer.status_code == 401
    assert answer.json()["error"]["message"] == "the API key has been revoked"
    again = await ada.call("DELETE", f"/api/v1/auth/apikeys/{made['id']}")
    assert again.status_code == 200, "revoking twice is harmless"


async def test_grpc_create_api_key_takes_the_token_in_the_request_or_in_metadata(
    http: httpx.AsyncClient, system: System
) -> None:
    ada = await User.signed_up(http, system)
    in_body = pb.CreateAPIKeyRequest(name="ci", token=ada.token, scopes=["gpus"])
    code, _, _ = await grpc_status(system, "CreateAPIKey", in_body, ())
    assert code == grpc.StatusCode.OK
    async with grpc.aio.insecure_channel(system.grpc_target) as channel:
        made = await pb_grpc.GPUProxyServiceStub(channel).CreateAPIKey(
            pb.CreateAPIKeyRequest(name="ci-2"), metadata=tuple(ada.session.items()), timeout=10
        )
    assert made.api_key.startswith(f"gpuproxy_{made.key_id}_")
    assert sorted(made.scopes) == ["billing", "gpus", "inference"]
    assert (await grpc_ping(system, (("x-api-key", made.api_key),))).message == "hi"


# --- escalation ----------------------------------------------------------------------------


async def test_scope_escalation_attempts_are_refused(
    http: httpx.AsyncClient, system: System
) -> None:
    ada = await User.signed_up(http, system)
    narrow = (await ada.make_key(scopes=["inference"]))["api_key"]

    over = await ada.call("POST", "/api/v1/auth/apikey", json={"name": "x", "scopes": ["admin"]})
    assert over.status_code == 403
    assert "admin" in over.json()["error"]["message"]

    key_mints_key = await ada.call(
        "POST", "/api/v1/auth/apikey", headers={"x-api-key": narrow}, json={"name": "x"}
    )
    assert key_mints_key.status_code == 403

    wider_limit = await ada.call(
        "POST", "/api/v1/auth/apikey", json={"name": "x", "rate_limit_per_minute": 1000}
    )
    assert wider_limit.status_code == 403
    unlimited = await ada.call(
        "POST", "/api/v1/auth/apikey", json={"name": "x", "rate_limit_per_minute": 0}
    )
    assert unlimited.status_code == 403

    for change in ({"role": "admin"}, {"rate_limit_per_minute": 0}, {"disabled": False}):
        own = await ada.call("PATCH", f"/api/v1/admin/users/{ada.user_id}", json=change)
        assert own.status_code == 403, change

    code, details, _ = await grpc_status(
        system, "GetTransactions", pb.GetTransactionsRequest(), (("x-api-key", narrow),)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "billing" in details
    code, _, _ = await grpc_status(
        system,
        "SetLoadBalancerStrategy",
        pb.SetLoadBalancerStrategyRequest(strategy="round_robin"),
        tuple(ada.session.items()),
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_an_admin_cannot_change_their_own_role_or_limit(
    http: httpx.AsyncClient, system: System, admin: dict[str, str]
) -> None:
    answer = await http.patch(
        f"/api/v1/admin/users/{system.admin_id}", headers=admin, json={"role": "user"}
    )
    assert answer.status_code == 403


async def test_role_changes_and_disabling_reach_existing_credentials(
    http: httpx.AsyncClient, system: System, admin: dict[str, str]
) -> None:
    ada = await User.signed_up(http, system)
    promoted = await http.patch(
        f"/api/v1/admin/users/{ada.user_id}", headers=admin, json={"role": "admin"}
    )
    assert promoted.status_code == 200
    await ada.log_in()
    admin_key = (await ada.make_key(scopes=["admin", "inference"]))["api_key"]
    as_key = {"x-api-key": admin_key}
    assert (await ada.call("GET", "/api/v1/admin/users", headers=as_key)).status_code == 200

    await http.patch(f"/api/v1/admin/users/{ada.user_id}", headers=admin, json={"role": "user"})

    async def demoted() -> bool:
        answer = await ada.call("GET", "/api/v1/admin/users", headers=as_key)
        return answer.status_code == 403

    await eventually(demoted)
    assert (await ada.call("GET", "/api/v1/user/me", headers=as_key)).status_code == 200

    await http.patch(f"/api/v1/admin/users/{ada.user_id}", headers=admin, json={"disabled": True})
    for headers in (as_key, ada.session):
        answer = await ada.call("GET", "/api/v1/user/me", headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]["message"] == "this account is disabled"
    refreshed = await http.post("/api/v1/auth/refresh", json={"refresh_token": ada.refresh_token})
    assert refreshed.status_code == 401


async def test_logout_ends_the_sessions_access_token_too(
    http: httpx.AsyncClient, system: System
) -> None:
    ada = await User.signed_up(http, system)
    assert (await ada.call("GET", "/api/v1/user/me")).status_code == 200
    await http.post("/api/v1/auth/logout", json={"refresh_token": ada.refresh_token})

    async def ended() -> bool:
        return (await ada.call("GET", "/api/v1/user/me")).status_code == 401

    await eventually(ended)


# --- tenancy -------------------------------------------------------------------------------


async def test_one_user_can_neither_see_nor_touch_anothers_keys_or_lists(
    http: httpx.AsyncClient, system: System, admin: dict[str, str]
) -> None:
    ada, bob = await User.signed_up(http, system), await User.signed_up(http, system)
    key = await ada.make_key(name="ada's")
    entry = await ada.call("POST", "/api/v1/ip-access/allowlist", json={"ip_range": "10.0.0.0/8"})
    assert entry.status_code == 201, entry.text

    # Naming another account is refused outright; another account's key or entry, named by
    # its id, answers as if it did not exist.
    attempts = [
        ("GET", f"/api/v1/auth/apikeys?user_id={ada.user_id}", 403),
        ("DELETE", f"/api/v1/auth/apikeys/{key['id']}", 404),
        ("GET", f"/api/v1/ip-access/config?user_id={ada.user_id}", 403),
        ("GET", f"/api/v1/ip-access/allowlist?user_id={ada.user_id}", 403),
        ("DELETE", f"/api/v1/ip-access/allowlist/{entry.json()['id']}", 404),
        ("GET", f"/api/v1/ip-access/log?user_id={ada.user_id}", 403),
    ]
    for method, path, status in attempts:
        answer = await bob.call(method, path)
        assert answer.status_code == status, (method, path, answer.text)
    assert (await bob.call("GET", f"/api/v1/admin/users/{ada.user_id}")).status_code == 403

    still = await ada.call("GET", "/api/v1/user/me", headers={"x-api-key": key["api_key"]})
    assert still.status_code == 200
    mine = (await bob.call("GET", "/api/v1/user/export")).json()
    assert mine["user"]["id"] == bob.user_id
    assert mine["api_keys"] == []
    assert mine["ip_access"]["allowlist"] == []

    root = await User.operator(http, system)
    as_admin = await root.call("GET", f"/api/v1/auth/apikeys?user_id={ada.user_id}")
    assert [k["id"] for k in as_admin.json()["api_keys"]] == [key["id"]]


async def test_the_export_holds_the_callers_own_data_and_no_secret(
    http: httpx.AsyncClient, system: System
) -> None:
    ada = await User.signed_up(http, system)
    key = await ada.make_key(name="export me")
    await ada.call("POST", "/api/v1/ip-access/denylist", json={"ip_address": "192.0.2.7"})
    answer = await ada.call("GET", "/api/v1/user/export")
    assert answer.status_code == 200
    data = answer.json()
    assert data["user"]["email"] == ada.email
    assert [k["name"] for k in data["api_keys"]] == ["export me"]
    assert data["ip_access"]["denylist"][0]["ip_range"] == "192.0.2.7/32"
    assert len(data["sessions"]) == 1
    for secret in (key["api_key"].rsplit("_", 1)[1], ada.refresh_token, "correct horse"):
        assert secret not in answer.text
    assert "password" not in answer.text
    assert "digest" not in answer.text


# --- rate limits ---------------------------------------------------------------------------


async def test_over_the_limit_both_doors_answer_429_or_resource_exhausted_with_headers(
    http: httpx.AsyncClient, system: System, admin: dict[str, str]
) -> None:
    await clear_of_a_new_minute()
    ada = await User.signed_up(http, system)
    key = (await ada.make_key(rate_limit_per_minute=3))["api_key"]
    answers = [
        await ada.call("GET", "/api/v1/user/me", headers={"x-api-key": key}) for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0"]
    assert answers[0].headers["x-ratelimit-limit"] == "3"

    over = await ada.call("GET", "/api/v1/user/me", headers={"x-api-key": key})
    assert over.status_code == 429
    assert over.json()["error"]["code"] == "resource_exhausted"
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert over.headers["x-ratelimit-remaining"] == "0"

    code, details, trailing = await grpc_status(
        system, "Ping", pb.PingRequest(), (("x-api-key", key),)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "per minute" in details
    assert 1 <= int(trailing["retry-after"]) <= 60


async def test_the_account_limit_covers_all_its_credentials_together(
    http: httpx.AsyncClient, system: System, admin: dict[str, str]
) -> None:
    await clear_of_a_new_minute()
    ada = await User.signed_up(http, system)
    key = (await ada.make_key())["api_key"]
    await http.patch(
        f"/api/v1/admin/users/{ada.user_id}", headers=admin, json={"rate_limit_per_minute": 4}
    )
    by_key = {"x-api-key": key}
    codes = [
        (await ada.call("GET", "/api/v1/user/me", headers=by_key)).status_code,
        (await ada.call("GET", "/api/v1/user/me")).status_code,
        (await ada.call("GET", "/api/v1/user/me", headers=by_key)).status_code,
        (await ada.call("GET", "/api/v1/user/me")).status_code,
        (await ada.call("GET", "/api/v1/user/me", headers=by_key)).status_code,
        (await ada.call("GET", "/api/v1/user/me")).status_code,
    ]
    assert codes == [200, 200, 200, 429, 429, 429], "making the key was the first of four"


# --- address lists -------------------------------------------------------------------------


async def test_an_allowlist_shuts_out_other_addresses_on_both_doors(
    http: httpx.AsyncClient, system: System
) -> None:
    ada = await User.signed_up(http, system)
    key = (await ada.make_key())["api_key"]
    await ada.call("POST", "/api/v1/ip-access/allowlist", json={"ip_range": "198.51.100.0/24"})

    locked_out = await ada.call("PUT", "/api/v1/ip-access/config", json={"mode": "allowlist"})
    assert locked_out.status_code == 412
    assert locked_out.json()["error"]["field"] == "mode"

    check = await ada.call("POST", "/api/v1/ip-access/check", json={"ip_address": "198.51.100.9"})
    assert check.json() == {
        "allowed": True,
        "reason": "address lists are disabled",
        "match_type": "disabled",
    }

    forced = await ada.call(
        "PUT",
        "/api/v1/ip-access/config",
        json={"mode": "allowlist", "audit_log_enabled": True, "force": True},
    )
    assert forced.json() == {"mode": "allowlist", "audit_log_enabled": True}

    async def refused() -> bool:
        answer = await ada.call("GET", "/api/v1/user/me", headers={"x-api-key": key})
        return answer.status_code == 403

    await eventually(refused)
    code, details, _ = await grpc_status(system, "Ping", pb.PingRequest(), (("x-api-key", key),))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "not on the allowlist" in details

    check = await ada.http.post(
        "/api/v1/ip-access/check",
        headers={"x-api-key": key},
        json={"ip_address": "198.51.100.9"},
    )
    assert check.status_code == 403, "the check itself comes from a refused address"


async def test_the_access_log_records_blocked_attempts(
    http: httpx.AsyncClient, system: System, admin: dict[str, str]
) -> None:
    ada = await User.signed_up(http, system)
    await ada.call(
        "POST", "/api/v1/ip-access/denylist", json={"ip_address": "127.0.0.1", "reason": "test"}
    )
    await ada.call("PUT", "/api/v1/ip-access/config", json={"mode": "denylist", "force": True})
    await eventually(lambda: _status_is(ada, 403))

    root = await User.operator(http, system)

    async def logged() -> bool:
        answer = await root.call("GET", f"/api/v1/ip-access/log?user_id={ada.user_id}")
        entries = answer.json()["entries"]
        return any(e["result"] == "blocked" and e["ip_address"] == "127.0.0.1" for e in entries)

    await eventually(logged)


async def _status_is(user: User, status: int) -> bool:
    return (await user.call("GET", "/api/v1/user/me")).status_code == status


async def test_bad_list_entries_are_refused_naming_the_field(
    http: httpx.AsyncClient, system: System
) -> None:
    ada = await User.signed_up(http, system)
    for body, field in (
        ({"ip_range": "10.0.0.0/33"}, "ip_range"),
        ({"ip_address": "not-an-ip"}, "ip_address"),
        ({"ip_address": "10.0.0.0/8"}, "ip_address"),
        ({}, "ip_address"),
        ({"ip_range": "10.0.0.0/8", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"ip_range": "10.0.0.0/8", "colour": "red"}, "colour"),
    ):
        answer = await ada.call("POST", "/api/v1/ip-access/denylist", json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["field"] == field
    assert (await ada.call("GET", "/api/v1/ip-access/denylist")).json()["entries"] == []
    mode = await ada.call("PUT", "/api/v1/ip-access/config", json={"mode": "sometimes"})
    assert mode.status_code == 400
    assert mode.json()["error"]["field"] == "mode"


async def test_forwarded_for_counts_only_from_a_trusted_proxy(
    nats_url: str, migrated_database: str
) -> None:
    async with (
        running_system(nats_url, migrated_database, trusted_proxies=("127.0.0.0/8",)) as system,
        httpx.AsyncClient(base_url=system.http_base, timeout=10) as http,
    ):
        ada = await User.signed_up(http, system)
        await ada.call("POST", "/api/v1/ip-access/allowlist", json={"ip_range": "203.0.113.0/24"})
        await ada.call("PUT", "/api/v1/ip-access/config", json={"mode": "allowlist", "force": True})
        via_proxy = {**ada.session, "x-forwarded-for": "198.51.100.1, 203.0.113.5"}
        await eventually(lambda: _status_is(ada, 403))
        assert (await ada.call("GET", "/api/v1/user/me", headers=via_proxy)).status_code == 200
        forged = {**ada.session, "x-forwarded-for": "203.0.113.5, 198.51.100.1"}
        assert (await ada.call("GET", "/api/v1/user/me", headers=forged)).status_code == 403
        metadata = (*ada.session.items(), ("x-forwarded-for", "203.0.113.5"))
        assert (await grpc_ping(system, metadata)).message == "hi"


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    http: httpx.AsyncClient, system: System
) -> None:
    ada = await User.signed_up(http, system)
    await ada.call("POST", "/api/v1/ip-access/allowlist", json={"ip_range": "203.0.113.0/24"})
    await ada.call("PUT", "/api/v1/ip-access/config", json={"mode": "allowlist", "force": True})
    spoofed = {**ada.session, "x-forwarded-for": "203.0.113.5"}
    await eventually(lambda: _status_is(ada, 403))
    assert (await ada.call("GET", "/api/v1/user/me", headers=spoofed)).status_code == 403


async def test_guessing_passwords_from_one_address_is_slowed_on_both_doors(
    nats_url: str, migrated_database: str
) -> None:
    await clear_of_a_new_minute()
    async with (
        running_system(nats_url, migrated_database, auth_attempts_per_minute=3) as system,
        httpx.AsyncClient(base_url=system.http_base, timeout=10) as http,
    ):
        guess = {"email": "ada@example.com", "password": "guess guess guess"}
        codes = [(await http.post("/api/v1/auth/login", json=guess)).status_code for _ in range(3)]
        over = await http.post("/api/v1/auth/login", json=guess)
        code, details, trailing = await grpc_status(
            system, "Login", pb.LoginRequest(email="ada@example.com", password="x" * 12), ()
        )
        api_key_still_works = await http.get(
            "/api/v1/user/me", headers={"x-api-key": system.api_key}
        )
    assert codes == [401, 401, 401]
    assert over.status_code == 429
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert (code, "retry-after" in trailing) == (grpc.StatusCode.RESOURCE_EXHAUSTED, True)
    assert "signing in from this address" in details
    assert api_key_still_works.status_code == 200
