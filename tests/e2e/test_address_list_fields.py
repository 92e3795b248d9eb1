"""The address-list routes take the field names a user guesses: `cidr` for `ip_range` and
`ip` for `ip_address`, with errors naming the name that was sent."""

from __future__ import annotations

import httpx

from tests.e2e.access_client import User
from tests.e2e.system import System


async def test_cidr_and_ip_are_taken_for_ip_range_and_ip_address(
    system: System, http: httpx.AsyncClient
) -> None:
    ada = await User.signed_up(http, system)
    by_cidr = await ada.call("POST", "/api/v1/ip-access/allowlist", json={"cidr": "10.0.0.0/8"})
    assert by_cidr.status_code == 201, by_cidr.text
    assert by_cidr.json()["ip_range"] == "10.0.0.0/8"
    by_ip = await ada.call(
        "POST", "/api/v1/ip-access/denylist", json={"ip": "192.0.2.7", "reason": "scanner"}
    )
    assert by_ip.status_code == 201, by_ip.text
    assert (by_ip.json()["ip_range"], by_ip.json()["description"]) == ("192.0.2.7/32", "scanner")

    checked = await ada.call("POST", "/api/v1/ip-access/check", json={"ip": "192.0.2.7"})
    assert checked.status_code == 200, checked.text
    by_name = await ada.call("POST", "/api/v1/ip-access/check", json={"ip_address": "192.0.2.7"})
    assert checked.json() == by_name.json()


async def test_errors_name_the_field_as_it_was_sent(
    system: System, http: httpx.AsyncClient
) -> None:
    ada = await User.signed_up(http, system)
    for path, body, field in (
        ("/api/v1/ip-access/allowlist", {"cidr": "10.0.0.0/33"}, "cidr"),
        ("/api/v1/ip-access/allowlist", {"ip": "not-an-ip"}, "ip"),
        ("/api/v1/ip-access/allowlist", {"ip": "10.0.0.0/8"}, "ip"),
        ("/api/v1/ip-access/allowlist", {"cidr": "10.0.0.0/8", "ip_range": "10.0.0.0/8"}, "cidr"),
        ("/api/v1/ip-access/denylist", {"ip": "192.0.2.7", "ip_address": "192.0.2.8"}, "ip"),
        ("/api/v1/ip-access/check", {"ip": "nowhere"}, "ip"),
        ("/api/v1/ip-access/check", {}, "ip_address"),
        ("/api/v1/ip-access/check", {"address": "192.0.2.7"}, "address"),
    ):
        answer = await ada.call("POST", path, json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["field"] == field, body
    assert (await ada.call("GET", "/api/v1/ip-access/allowlist")).json()["entries"] == []
