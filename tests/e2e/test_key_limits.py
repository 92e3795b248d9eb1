"""A key without a rate limit of its own follows its account's: none for an account without
one (the first admin), the account's as an admin changes it."""

from __future__ import annotations

import httpx

from tests.e2e.access_client import User, clear_of_a_new_minute, eventually
from tests.e2e.system import System


async def test_the_first_admins_key_has_no_limit_like_its_account(
    system: System, http: httpx.AsyncClient
) -> None:
    admin = await User.operator(http, system)
    made = await admin.make_key(name="admin's laptop")
    assert made["rate_limit_per_minute"] is None
    listed = (await admin.call("GET", "/api/v1/auth/apikeys")).json()["api_keys"]
    assert [k["rate_limit_per_minute"] for k in listed if k["id"] == made["id"]] == [None]

    answer = await admin.call("GET", "/api/v1/user/me", headers={"x-api-key": made["api_key"]})
    assert answer.status_code == 200, answer.text
    assert "x-ratelimit-limit" not in answer.headers, "nothing counts this key's requests"


async def test_a_key_without_its_own_limit_follows_its_accounts_limit(
    system: System, http: httpx.AsyncClient
) -> None:
    await clear_of_a_new_minute()
    admin = await User.operator(http, system)
    ada = await User.signed_up(http, system)
    key = await ada.make_key()
    assert key["rate_limit_per_minute"] is None
    by_key = {"x-api-key": key["api_key"]}
    first = await ada.call("GET", "/api/v1/user/me", headers=by_key)
    assert first.headers["x-ratelimit-limit"] == "100", "the account's default"

    raised = await admin.call(
        "PATCH", f"/api/v1/admin/users/{ada.user_id}", json={"rate_limit_per_minute": 500}
    )
    assert raised.status_code == 200, raised.text

    async def follows_the_account() -> bool:
        answer = await ada.call("GET", "/api/v1/user/me", headers=by_key)
        return answer.headers["x-ratelimit-limit"] == "500"

    # The change reaches the gateway through the access bucket; the key needs no change.
    await eventually(follows_the_account)

    narrower = await ada.make_key(rate_limit_per_minute=7)
    assert narrower["rate_limit_per_minute"] == 7
    with_own = await ada.call("GET", "/api/v1/user/me", headers={"x-api-key": narrower["api_key"]})
    assert with_own.headers["x-ratelimit-limit"] == "7"
