"""The caller's address, and what each mode of a user's address lists says about it."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.auth.addresses import (
    UNKNOWN,
    client_address,
    decide,
    grpc_peer_host,
    parse_network,
)
from schemas.access import IpMode, IpRule, Role, UserAccess
from schemas.errors import InvalidArgument

PROXIES = (ipaddress.ip_network("10.0.0.0/8"),)
NOW = 1_000_000


def user(mode: IpMode, allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> UserAccess:
    return UserAccess(
        user_id="u",
        role=Role.USER,
        disabled=False,
        rate_limit_per_minute=100,
        ip_mode=mode,
        allow=tuple(IpRule(id=f"a{i}", cidr=c) for i, c in enumerate(allow)),
        deny=tuple(IpRule(id=f"d{i}", cidr=c) for i, c in enumerate(deny)),
    )


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:5000", "127.0.0.1"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("unix:/tmp/socket", ""),
    ],
)
def test_grpc_peer_strings_give_their_host(peer: str, host: str) -> None:
    assert grpc_peer_host(peer) == host


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # not a proxy: header ignored
        ("10.0.0.2", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # left of the client: forged
        ("10.0.0.2", "198.51.100.1, 10.0.0.3", "198.51.100.1"),  # a chain of our proxies
        ("10.0.0.2", "garbage, 10.0.0.3", "10.0.0.3"),
        ("10.0.0.2", None, "10.0.0.2"),
        ("::ffff:203.0.113.9", None, "203.0.113.9"),
    ],
)
def test_forwarded_for_is_read_from_the_right_and_only_behind_trusted_proxies(
    peer: str, forwarded: str | None, client: str
) -> None:
    assert str(client_address(peer, forwarded, PROXIES)) == client


def test_a_peer_without_an_ip_matches_no_entry() -> None:
    assert client_address("", None, PROXIES) == UNKNOWN
    assert not decide(user(IpMode.ALLOWLIST, allow=("0.0.0.0/0",)), UNKNOWN, NOW).allowed


@pytest.mark.parametrize(
    ("mode", "address", "allowed", "match"),
    [
        (IpMode.DISABLED, "6.6.6.6", True, "disabled"),
        (IpMode.ALLOWLIST, "192.0.2.5", True, "allowlist"),
        (IpMode.ALLOWLIST, "192.0.2.66", True, "allowlist"),  # denylist does not apply
        (IpMode.ALLOWLIST, "6.6.6.6", False, "none"),
        (IpMode.DENYLIST, "192.0.2.66", False, "denylist"),
        (IpMode.DENYLIST, "6.6.6.6", True, "none"),
        (IpMode.STRICT, "192.0.2.5", True, "allowlist"),
        (IpMode.STRICT, "192.0.2.66", False, "denylist"),  # the denylist wins
        (IpMode.STRICT, "6.6.6.6", False, "none"),
    ],
)
def test_each_mode_decides_as_documented(
    mode: IpMode, address: str, allowed: bool, match: str
) -> None:
    rules = user(mode, allow=("192.0.2.0/24",), deny=("192.0.2.64/26",))
    decision = decide(rules, ipaddress.ip_address(address), NOW)
    assert (decision.allowed, decision.match_type) == (allowed, match)


def test_an_expired_entry_no_longer_counts() -> None:
    rules = UserAccess(
        user_id="u",
        role=Role.USER,
        disabled=False,
        rate_limit_per_minute=1,
        ip_mode=IpMode.DENYLIST,
        deny=(IpRule(id="d", cidr="192.0.2.0/24", expires_at_ms=NOW - 1),),
    )
    assert decide(rules, ipaddress.ip_address("192.0.2.1"), NOW).allowed


def test_ipv4_rules_never_match_ipv6_addresses() -> None:
    rules = user(IpMode.ALLOWLIST, allow=("0.0.0.0/0",))
    assert not decide(rules, ipaddress.ip_address("2001:db8::1"), NOW).allowed


@pytest.mark.parametrize("text", ["10.0.0.0/33", "10.0.0", "::g", "", "10.0.0.0/8/8"])
def test_a_bad_range_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_network(text, field="ip_range")
    assert raised.value.field == "ip_range"
