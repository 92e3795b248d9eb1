"""Which upstream addresses the proxy connects to: its guard against request forgery (SSRF).

An upstream's base URL comes from our own registry, never from the caller, but the machine
behind it may still point inside: a marketplace host that registers 10.0.0.5, a DNS name
that resolves to 127.0.0.1 or to the cloud's metadata service. Before the proxy connects,
every address the host stands for is checked, and a host with any refused address is not
contacted at all (a DNS answer that mixes a public address with an inner one is how
rebinding slips through a check of the first answer only).

Refused: loopback, unspecified, private, link-local, shared (CGNAT), cloud metadata,
multicast, broadcast and reserved addresses, in IPv4 and IPv6, and the IPv6 forms that carry
one of those IPv4 addresses inside (mapped, translated, compatible, 6to4, Teredo, NAT64).

Two ways through, both narrow:

- `GPUPROXY_UPSTREAM_ALLOW`, a comma-separated list of networks (a lab network, a static
  endpoint on 10.x): an address in one of them passes whatever its class. A metadata
  address passes only when the list names that very address (a /32 or /128): a broad entry
  such as 169.254.0.0/16 or 100.64.0.0/10 is written for a lab, never for the credentials
  a metadata service hands out.
- `trusted_loopback`, per call, for the `sim` provider whose machines run on 127.0.0.1 and
  which vouches for them: it lets loopback through, nothing else.

`pin` resolves a URL's host once and returns the checked address to connect to, keeping
the name for the Host header and TLS; `resolve` is the same check for a connector that
resolves names itself on every new connection (`upstream_client`).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import os
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

import msgspec

from schemas.errors import ConfigError, FailedPrecondition, Unavailable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_VARIABLE = "GPUPROXY_UPSTREAM_ALLOW"
SCHEMES = {"http": 80, "https": 443}


class AddressClass(enum.StrEnum):
    """A class of address the proxy refuses, as its error names it."""

    LOOPBACK = "a loopback address"
    UNSPECIFIED = "an unspecified address"
    PRIVATE = "a private address"
    LINK_LOCAL = "a link-local address"
    SHARED = "a shared (CGNAT) address"
    METADATA = "a cloud metadata address"
    MULTICAST = "a multicast address"
    BROADCAST = "a broadcast address"
    RESERVED = "a reserved address"


class Refused(FailedPrecondition):
    """An upstream the proxy will not contact.

    FAILED_PRECONDITION rather than PERMISSION_DENIED: the caller's rights are not in
    question (the address comes from our registry, not from them), and no retry can succeed
    until the system changes: the machine's address, or the operator's allow-list.
    """

    def __init__(
        self,
        host: str,
        problem: str,
        *,
        address_class: AddressClass | None = None,
        address: Address | None = None,
    ) -> None:
        super().__init__(f"refused to contact upstream {host!r}: {problem}")
        self.host = host
        self.address_class = address_class
        self.address = address
        """The refused address; for logs, kept out of the message an end user may read."""


class AllowList(msgspec.Struct, frozen=True):
    """Networks whose addresses pass whatever their class (`GPUPROXY_UPSTREAM_ALLOW`)."""

    networks: tuple[Network, ...] = ()

    def allows(self, address: Address) -> bool:
        if address in _METADATA:
            return any(
                network.num_addresses == 1 and network.network_address == address
                for network in self.networks
            )
        return any(address in network for network in self.networks)


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """An upstream URL taken apart."""

    scheme: str
    host: str
    """As written in the URL, lower case, without brackets: the Host header and TLS name."""
    port: int
    target: str
    """Path and query: what follows the host in the request line."""

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SCHEMES[self.scheme] else f"{host}:{self.port}"


class Pinned(msgspec.Struct, frozen=True, kw_only=True):
    """A checked upstream: connect to `address`, speak to `target.host`."""

    target: Target
    address: Address


def _networks(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


_METADATA: frozenset[Address] = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",  # AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS pod identity
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
    )
)

# Most specific first: the first network that holds an address names its class.
_CLASSES: tuple[tuple[tuple[Network, ...], AddressClass], ...] = (
    (_networks("0.0.0.0/8", "::/128"), AddressClass.UNSPECIFIED),
    (_networks("127.0.0.0/8", "::1/128"), AddressClass.LOOPBACK),
    (
        _networks(
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "fc00::/7",  # unique local
            "fec0::/10",  # site-local, deprecated but still routed by some stacks
            "64:ff9b:1::/48",  # local-use NAT64: where the IPv4 sits inside is unknowable
        ),
        AddressClass.PRIVATE,
    ),
    (_networks("169.254.0.0/16", "fe80::/10"), AddressClass.LINK_LOCAL),
    (_networks("100.64.0.0/10"), AddressClass.SHARED),
    (_networks("224.0.0.0/4", "ff00::/8"), AddressClass.MULTICAST),
    (_networks("255.255.255.255/32"), AddressClass.BROADCAST),
    (
        _networks(
            "240.0.0.0/4",
            "192.0.0.0/24",  # IETF protocol assignments
            "192.0.2.0/24",  # documentation
            "192.88.99.0/24",  # former 6to4 relays
            "198.18.0.0/15",  # benchmarking
            "198.51.100.0/24",  # documentation
            "203.0.113.0/24",  # documentation
            "::/8",  # IPv4-compatible and other unassigned forms
            "100::/64",  # discard-only
            "2001:2::/48",  # benchmarking
            "2001:10::/28",  # ORCHID
            "2001:20::/28",  # ORCHIDv2
            "2001:db8::/32",  # documentation
            "3fff::/20",  # documentation
            "5f00::/16",  # segment routing identifiers
        ),
        AddressClass.RESERVED,
    ),
)

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LAST_32_BITS = 0xFFFFFFFF


def _embedded(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries, which a translator or tunnel reaches."""
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo
    if address in _TRANSLATED or address in _COMPATIBLE or address in _NAT64:
        return (ipaddress.IPv4Address(int(address) & _LAST_32_BITS),)
    return ()


def _plain(address: Address) -> Address:
    """The address without an IPv6 zone (`fe80::1%eth0`), which comparisons would trip on."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return ipaddress.IPv6Address(address.packed)
    return address


def classify(address: Address) -> AddressClass | None:
    """The refused class `address` is in; None for an address the proxy may contact."""
    address = _plain(address)
    if address in _METADATA:
        return AddressClass.METADATA
    # :: and ::1 lie in the compatible range too, but are classes of their own.
    if isinstance(address, ipaddress.IPv6Address) and int(address) > 1:
        inner = _embedded(address)
        for embedded in inner:
            found = classify(embedded)
            if found is not None:
                return found
        if inner and address not in _COMPATIBLE:
            # A working translation form of a public IPv4 address; the deprecated
            # compatible form is never routed and falls through to "reserved".
            return None
    for networks, kind in _CLASSES:
        if any(address in network for network in networks):
            return kind
    return None


def refusal(
    address: Address, *, allow: AllowList, trusted_loopback: bool = False
) -> AddressClass | None:
    """Why the proxy will not contact `address`, or None when it may."""
    plain = _plain(address)
    kind = classify(plain)
    if kind is None or (kind is AddressClass.LOOPBACK and trusted_loopback):
        return None
    if allow.allows(plain):
        return None
    if isinstance(plain, ipaddress.IPv6Address) and any(
        allow.allows(embedded) for embedded in _embedded(plain)
    ):
        return None
    return kind


def literal(host: str) -> Address | None:
    """The IP address `host` spells (brackets and zone allowed), or None for a name."""
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def check(host: str, address: Address, *, allow: AllowList, trusted_loopback: bool = False) -> None:
    """Raise `Refused` when the proxy will not contact `address`, which `host` stands for."""
    kind = refusal(address, allow=allow, trusted_loopback=trusted_loopback)
    if kind is not None:
        verb = "is" if literal(host) is not None else "resolves to"
        raise Refused(host, f"it {verb} {kind}", address_class=kind, address=address)


async def resolve(
    host: str,
    port: int,
    *,
    allow: AllowList,
    trusted_loopback: bool = False,
    family: int = socket.AF_UNSPEC,
) -> tuple[Address, ...]:
    """Every address `host` stands for, each checked, in the resolver's order of preference.

    A literal address is checked without DNS; a name is resolved once, and one refused
    answer refuses the host. Raises `Refused`, or `Unavailable` when the name does not
    resolve.
    """
    given = literal(host)
    if given is not None:
        check(host, given, allow=allow, trusted_loopback=trusted_loopback)
        return (given,)
    loop = asyncio.get_running_loop()
    try:
        answers = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise Unavailable(f"upstream host {host!r} does not resolve") from None
    found: list[Address] = []
    for *_, sockaddr in answers:
        address = ipaddress.ip_address(sockaddr[0])
        check(host, address, allow=allow, trusted_loopback=trusted_loopback)
        if address not in found:
            found.append(address)
    if not found:
        raise Unavailable(f"upstream host {host!r} has no IP address")
    return tuple(found)


def parse_url(url: str) -> Target:
    """An upstream URL taken apart: http or https, a host, no credentials; else `Refused`.

    No message repeats the URL: its path or query may carry a token.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise Refused("?", "its URL cannot be parsed") from None
    host = parts.hostname or ""
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise Refused(host or "?", "its URL must be http:// or https://")
    if not host:
        raise Refused("?", "its URL names no host")
    if parts.username is not None or parts.password is not None:
        raise Refused(host, "its URL carries credentials (user@ or user:password@)")
    if port == 0:
        raise Refused(host, "its URL names port 0")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme=scheme, host=host, port=port or SCHEMES[scheme], target=target)


async def pin(url: str, *, allow: AllowList, trusted_loopback: bool = False) -> Pinned:
    """The address to connect to for `url`, checked, with the name kept for Host and TLS.

    The host is resolved once and every address it stands for is checked; the first, in
    the resolver's order, is the one to use.
    """
    target = parse_url(url)
    addresses = await resolve(
        target.host, target.port, allow=allow, trusted_loopback=trusted_loopback
    )
    return Pinned(target=target, address=addresses[0])


def parse_allow_list(text: str, *, field: str = ALLOW_VARIABLE) -> AllowList:
    """Comma-separated IP networks or single addresses; blank entries are skipped."""
    networks: list[Network] = []
    for part in text.split(","):
        entry = part.strip()
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry)
        except ValueError:
            try:
                wider = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ConfigError(
                    f"{entry!r} is not an IP address or CIDR range", field=field
                ) from None
            # 10.1.2.3/8 would widen silently to all of 10/8: in a list that opens the
            # guard, the wider meaning must be written out.
            raise ConfigError(
                f"{entry!r} has bits set past its prefix; write {wider} for that network",
                field=field,
            ) from None
        networks.append(network)
    return AllowList(tuple(networks))


def load_allow_list(env: Mapping[str, str] | None = None) -> AllowList:
    """The allow-list `GPUPROXY_UPSTREAM_ALLOW` sets; empty when unset."""
    env = os.environ if env is None else env
    return parse_allow_list(env.get(ALLOW_VARIABLE, ""))
