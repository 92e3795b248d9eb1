"""The upstream address guard: which addresses the proxy refuses, and the two ways through."""

from __future__ import annotations

import ipaddress

import pytest

from schemas.errors import ConfigError, ErrorCode, FailedPrecondition, Unavailable
from workers.proxy.addresses import (
    ALLOW_VARIABLE,
    AddressClass,
    AllowList,
    Refused,
    classify,
    load_allow_list,
    parse_allow_list,
    pin,
)

NOTHING = AllowList()

REFUSED = [
    ("127.0.0.1", AddressClass.LOOPBACK),
    ("127.255.0.9", AddressClass.LOOPBACK),
    ("::1", AddressClass.LOOPBACK),
    ("0.0.0.0", AddressClass.UNSPECIFIED),
    ("0.1.2.3", AddressClass.UNSPECIFIED),
    ("::", AddressClass.UNSPECIFIED),
    ("10.0.0.1", AddressClass.PRIVATE),
    ("172.16.0.1", AddressClass.PRIVATE),
    ("172.31.255.254", AddressClass.PRIVATE),
    ("192.168.1.1", AddressClass.PRIVATE),
    ("fc00::1", AddressClass.PRIVATE),
    ("fd12:3456::1", AddressClass.PRIVATE),
    ("169.254.1.1", AddressClass.LINK_LOCAL),
    ("fe80::1", AddressClass.LINK_LOCAL),
    ("100.64.0.1", AddressClass.SHARED),
    ("100.127.255.254", AddressClass.SHARED),
    ("169.254.169.254", AddressClass.METADATA),
    ("100.100.100.200", AddressClass.METADATA),
    ("fd00:ec2::254", AddressClass.METADATA),
    ("224.0.0.1", AddressClass.MULTICAST),
    ("239.255.255.250", AddressClass.MULTICAST),
    ("ff02::1", AddressClass.MULTICAST),
    ("255.255.255.255", AddressClass.BROADCAST),
    ("240.0.0.1", AddressClass.RESERVED),
    ("192.0.2.1", AddressClass.RESERVED),
    ("2001:db8::1", AddressClass.RESERVED),
]

EMBEDDED = [
    ("::ffff:127.0.0.1", AddressClass.LOOPBACK),  # IPv4-mapped
    ("::ffff:10.0.0.1", AddressClass.PRIVATE),
    ("::ffff:169.254.169.254", AddressClass.METADATA),
    ("::ffff:0.0.0.0", AddressClass.UNSPECIFIED),
    ("::ffff:0:192.168.0.1", AddressClass.PRIVATE),  # IPv4-translated
    ("::127.0.0.1", AddressClass.LOOPBACK),  # IPv4-compatible
    ("::10.0.0.1", AddressClass.PRIVATE),
    ("2002:7f00:1::", AddressClass.LOOPBACK),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::1", AddressClass.METADATA),  # 6to4 of 169.254.169.254
    ("64:ff9b::127.0.0.1", AddressClass.LOOPBACK),  # NAT64
    ("64:ff9b::100.64.0.1", AddressClass.SHARED),
    ("64:ff9b:1::1", AddressClass.PRIVATE),  # local-use NAT64
]


@pytest.mark.parametrize(("address", "kind"), REFUSED)
async def test_an_address_of_each_refused_class_is_refused_by_name(
    address: str, kind: AddressClass
) -> None:
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(Refused) as refused:
        await pin(f"http://{host}:8000/v1/chat/completions", allow=NOTHING)
    assert refused.value.address_class is kind
    assert str(kind) in refused.value.message
    assert address in refused.value.message
    assert refused.value.address == ipaddress.ip_address(address)


@pytest.mark.parametrize(("address", "kind"), EMBEDDED)
async def test_an_ipv6_form_carrying_a_refused_ipv4_address_is_refused(
    address: str, kind: AddressClass
) -> None:
    with pytest.raises(Refused) as refused:
        await pin(f"http://[{address}]/", allow=NOTHING)
    assert refused.value.address_class is kind
    assert str(kind) in refused.value.message


def test_the_deprecated_compatible_form_of_a_public_address_is_reserved() -> None:
    assert classify(ipaddress.ip_address("::8.8.8.8")) is AddressClass.RESERVED


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8"]
)
async def test_a_public_literal_address_is_pinned_without_dns(address: str) -> None:
    host = f"[{address}]" if ":" in address else address
    pinned = await pin(f"https://{host}/v1/models", allow=NOTHING)
    assert pinned.address == ipaddress.ip_address(address)
    assert pinned.target.port == 443


async def test_localhost_is_refused_as_the_loopback_it_resolves_to() -> None:
    with pytest.raises(Refused) as refused:
        await pin("http://localhost:8000/v1/models", allow=NOTHING)
    assert refused.value.address_class is AddressClass.LOOPBACK
    assert refused.value.message == (
        "refused to contact upstream 'localhost': it resolves to a loopback address"
    )


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.0.0.1", "0177.0.0.1"])
async def test_a_numeric_spelling_of_loopback_is_refused(host: str) -> None:
    with pytest.raises(Refused) as refused:
        await pin(f"http://{host}:8000/", allow=NOTHING)
    assert refused.value.address_class is AddressClass.LOOPBACK


async def test_the_allow_list_lets_a_private_address_through() -> None:
    allow = parse_allow_list("10.1.0.0/16")
    pinned = await pin("http://10.1.2.3:8000/v1", allow=allow)
    assert pinned.address == ipaddress.ip_address("10.1.2.3")
    with pytest.raises(Refused):
        await pin("http://10.2.0.1:8000/v1", allow=allow)


async def test_the_allow_list_covers_the_mapped_form_of_an_allowed_address() -> None:
    pinned = await pin("http://[::ffff:10.1.2.3]/", allow=parse_allow_list("10.0.0.0/8"))
    assert pinned.address == ipaddress.ip_address("::ffff:10.1.2.3")


async def test_a_broad_allowed_network_does_not_open_the_metadata_address() -> None:
    with pytest.raises(Refused) as refused:
        await pin("http://169.254.169.254/", allow=parse_allow_list("169.254.0.0/16"))
    assert refused.value.address_class is AddressClass.METADATA
    with pytest.raises(Refused):
        await pin("http://100.100.100.200/", allow=parse_allow_list("0.0.0.0/0"))


async def test_the_allow_list_naming_the_metadata_address_itself_lets_it_through() -> None:
    pinned = await pin("http://169.254.169.254/", allow=parse_allow_list("169.254.169.254"))
    assert pinned.address == ipaddress.ip_address("169.254.169.254")


async def test_trusted_loopback_lets_loopback_through_with_the_name_kept() -> None:
    pinned = await pin("http://localhost:9001/v1/chat?x=1", allow=NOTHING, trusted_loopback=True)
    assert pinned.address == ipaddress.ip_address("127.0.0.1")
    assert pinned.target.host == "localhost"
    assert pinned.target.host_header == "localhost:9001"
    assert pinned.target.target == "/v1/chat?x=1"
    pinned = await pin("http://[::1]:9001/", allow=NOTHING, trusted_loopback=True)
    assert pinned.address == ipaddress.ip_address("::1")
    assert pinned.target.host_header == "[::1]:9001"


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("10.0.0.1", AddressClass.PRIVATE),
        ("0.0.0.0", AddressClass.UNSPECIFIED),
        ("169.254.169.254", AddressClass.METADATA),
        ("[fe80::1]", AddressClass.LINK_LOCAL),
    ],
)
async def test_trusted_loopback_lets_nothing_else_through(host: str, kind: AddressClass) -> None:
    with pytest.raises(Refused) as refused:
        await pin(f"http://{host}/", allow=NOTHING, trusted_loopback=True)
    assert refused.value.address_class is kind


async def test_a_url_with_credentials_is_refused_without_repeating_them() -> None:
    with pytest.raises(Refused) as refused:
        await pin("https://admin:hunter2@8.8.8.8/v1?api_key=sk-secret", allow=NOTHING)
    assert "credentials" in refused.value.message
    for secret in ("admin", "hunter2", "sk-secret", "/v1"):
        assert secret not in refused.value.message


@pytest.mark.parametrize(
    "url", ["ftp://8.8.8.8/x", "file:///etc/passwd", "gopher://8.8.8.8/", "8.8.8.8:80/x"]
)
async def test_a_scheme_other_than_http_or_https_is_refused(url: str) -> None:
    with pytest.raises(Refused) as refused:
        await pin(url, allow=NOTHING)
    assert "http:// or https://" in refused.value.message


async def test_a_refusal_names_the_host_but_never_the_path_or_query() -> None:
    with pytest.raises(Refused) as refused:
        await pin("http://10.0.0.1:8000/secret/path?token=abc", allow=NOTHING)
    assert "10.0.0.1" in refused.value.message
    assert "secret" not in refused.value.message
    assert "token" not in refused.value.message


def test_a_refusal_is_a_failed_precondition_that_no_retry_fixes() -> None:
    error = Refused("10.0.0.1", "it is a private address")
    assert isinstance(error, FailedPrecondition)
    assert error.to_info().code is ErrorCode.FAILED_PRECONDITION
    assert not error.retriable


async def test_a_name_that_does_not_resolve_is_unavailable() -> None:
    with pytest.raises(Unavailable) as unavailable:
        await pin("http://no-such-machine.invalid:8000/", allow=NOTHING)
    assert "no-such-machine.invalid" in unavailable.value.message


def test_the_allow_list_parses_networks_and_single_addresses() -> None:
    allow = parse_allow_list(" 10.0.0.0/8, ,192.168.5.7,fd00::/8 ,")
    assert [str(n) for n in allow.networks] == ["10.0.0.0/8", "192.168.5.7/32", "fd00::/8"]
    assert parse_allow_list("").networks == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.0/8,10.0.0.0/33", "'10.0.0.0/33' is not an IP address or CIDR range"),
        ("lab-network", "'lab-network' is not an IP address or CIDR range"),
        ("10.0.0.0/8;192.168.0.0/16", "'10.0.0.0/8;192.168.0.0/16' is not an IP address"),
        ("10.1.2.3/8", "'10.1.2.3/8' has bits set past its prefix; write 10.0.0.0/8"),
    ],
)
def test_the_allow_list_parser_names_the_bad_entry(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_allow_list(text)
    assert error.value.field == ALLOW_VARIABLE
    assert message in error.value.message


def test_the_allow_list_is_read_from_its_environment_variable() -> None:
    assert load_allow_list({}).networks == ()
    allow = load_allow_list({ALLOW_VARIABLE: "127.0.0.0/8"})
    assert allow.allows(ipaddress.ip_address("127.0.0.1"))
    with pytest.raises(ConfigError):
        load_allow_list({ALLOW_VARIABLE: "nope"})
