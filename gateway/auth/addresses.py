"""The caller's address, and what a user's address lists say about it.

The address is the peer of the connection. `X-Forwarded-For` counts only when that peer is a
configured trusted proxy, and then the hops are read from the right: the first one that is
not itself a trusted proxy is the client (anything left of it the client could have forged).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

import msgspec

from schemas.access import IpMode, IpRule, UserAccess
from schemas.errors import InvalidArgument

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

UNKNOWN = ipaddress.IPv6Address("::")
"""Stands for a peer without an IP address (a Unix socket): matches no list entry."""


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    allowed: bool
    reason: str
    match_type: str
    """`allowlist`, `denylist`, `none` (no entry matched) or `disabled`."""


def parse_network(text: str, *, field: str) -> Network:
    """A CIDR or a single address (as a /32 or /128), in its canonical spelling."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InvalidArgument("is not an IP address or CIDR range", field=field) from None


def parse_address(text: str, *, field: str) -> Address:
    try:
        return _address(text.strip())
    except ValueError:
        raise InvalidArgument("is not an IP address", field=field) from None


@functools.lru_cache(maxsize=65536)
def _address(text: str) -> Address:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=65536)
def _network(cidr: str) -> Network:
    return ipaddress.ip_network(cidr, strict=False)


def grpc_peer_host(peer: str) -> str:
    """The host part of grpc's peer string: `ipv4:1.2.3.4:5`, `ipv6:[::1]:5`, `unix:...`."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""


def client_address(
    peer_host: str, forwarded_for: str | None, trusted: Sequence[Network]
) -> Address:
    try:
        address = _address(peer_host)
    except ValueError:
        return UNKNOWN
    if not forwarded_for or not _is_trusted(address, trusted):
        return address
    for hop in reversed(forwarded_for.split(",")):
        try:
            address = _address(hop.strip())
        except ValueError:
            # A hop we cannot read ends the chain: trust stops at the last proxy we know.
            return address
        if not _is_trusted(address, trusted):
            return address
    return address


def _is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)


def _first_match(address: Address, rules: tuple[IpRule, ...], now_ms: int) -> IpRule | None:
    for rule in rules:
        if rule.expires_at_ms is not None and rule.expires_at_ms <= now_ms:
            continue
        network = _network(rule.cidr)
        if address.version == network.version and address in network:
            return rule
    return None


def decide(user: UserAccess, address: Address, now_ms: int) -> Decision:
    mode = user.ip_mode
    if mode is IpMode.DISABLED:
        return Decision(allowed=True, reason="address lists are disabled", match_type="disabled")
    if mode in (IpMode.DENYLIST, IpMode.STRICT):
        denied = _first_match(address, user.deny, now_ms)
        if denied is not None:
            return Decision(
                allowed=False, reason=f"on the denylist ({denied.cidr})", match_type="denylist"
            )
    if mode in (IpMode.ALLOWLIST, IpMode.STRICT):
        allowed = _first_match(address, user.allow, now_ms)
        if allowed is None:
            return Decision(allowed=False, reason="not on the allowlist", match_type="none")
        return Decision(
            allowed=True, reason=f"on the allowlist ({allowed.cidr})", match_type="allowlist"
        )
    return Decision(allowed=True, reason="not on the denylist", match_type="none")
