"""Query parameters are checked as strictly as bodies: a route refuses one it does not take,
naming it, instead of answering as if it had not been sent."""

from __future__ import annotations

import re

import httpx

from tests.e2e.access_client import User
from tests.e2e.system import System
from tests.e2e.test_access_census import every_route

PROBES = {"/health", "/healthz", "/readyz"}
"""Health probes answer whatever a balancer appends to their address."""


async def test_a_misspelt_filter_is_refused_not_ignored(
    system: System, http: httpx.AsyncClient
) -> None:
    user = await User.signed_up(http, system)
    answer = await user.call("GET", "/api/v1/gpu/instances", params={"min_ram": "4000"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_argument"
    assert error["field"] == "min_ram"
    assert "min_vram" in error["message"], "the answer says which parameters the route takes"


async def test_a_parameter_given_twice_is_refused_naming_it(
    system: System, http: httpx.AsyncClient
) -> None:
    user = await User.signed_up(http, system)
    answer = await user.call("GET", "/api/v1/gpu/instances?provider=sim&provider=static")
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["field"] == "provider"


async def test_every_route_refuses_a_query_parameter_it_does_not_take(
    system: System, http: httpx.AsyncClient
) -> None:
    admin = await User.operator(http, system)
    checked = 0
    for method, path, _ in every_route():
        if path in PROBES:
            continue
        url = re.sub(r"\{[^}]+\}", "x0", path)
        answer = await admin.call(method, url, params={"colour": "red"}, json={})
        assert answer.status_code == 400, (method, path, answer.text)
        error = answer.json()["error"]
        # OpenAI's shape under /v1/ names the field `param`.
        assert error.get("field", error.get("param")) == "colour", (method, path)
        checked += 1
    assert checked > 30


async def test_the_parameters_a_route_names_are_still_taken(
    system: System, http: httpx.AsyncClient
) -> None:
    user = await User.signed_up(http, system)
    for path, params in (
        ("/api/v1/gpu/instances", {"provider": "sim", "min_vram": "1", "limit": "2"}),
        ("/api/v1/gpu/instances/mine", {"include_ended": "true", "user_id": user.user_id}),
        ("/api/v1/gpu/reservations", {"include_ended": "false"}),
        ("/api/v1/gpu/classify", {"name": "RTX 4090"}),
        ("/api/v1/gpu/available", {"vendor": "nvidia"}),
        ("/api/v1/ip-access/log", {"limit": "5", "user_id": user.user_id}),
    ):
        answer = await user.call("GET", path, params=params)
        assert answer.status_code == 200, (path, answer.text)
