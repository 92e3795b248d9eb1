"""Every entry point of both front doors knows who calls: a census of gRPC methods (from the
service descriptors) and HTTP routes (from the app), each tried without and with bad
credentials. A method or route added without an access rule fails here."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import httpx
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from starlette.routing import Route, WebSocketRoute

from gateway.auth.http_guard import REQUIREMENT, HttpGuard
from gateway.auth.policy import GRPC_METHODS, Requirement
from gateway.auth.tokens import AUDIENCE, ISSUER, TokenAuthority, hmac_ring
from gateway.http_app import build_app
from gateway.pb import gpuproxy_pb2 as pb
from tests.e2e.system import System, running_system
from tests.unit.auth.test_tokens import forge

SERVICES = (
    pb.DESCRIPTOR.services_by_name["GPUProxyService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)
PUBLIC_GRPC = {"Login", "HealthCheck", "Check", "Watch", "List", "ServerReflectionInfo"}
PUBLIC_HTTP = {
    ("GET", "/health"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/refresh"),
    ("POST", "/api/v1/auth/logout"),
}
UNKNOWN_KEY = "gpuproxy_0123456789abcdef_" + "A" * 43


def every_method() -> list[tuple[str, MethodDescriptor]]:
    return [(f"/{s.full_name}/{m.name}", m) for s in SERVICES for m in s.methods]


def every_route() -> list[tuple[str, str, Requirement | None]]:
    nothing = cast(Any, None)
    app = build_app(
        nothing, nothing, HttpGuard(nothing), nothing, nothing, nothing, nothing, nothing
    )
    found = []
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            # Admitted by the same gatekeeper at the handshake (tests/e2e/test_inference_legacy).
            assert getattr(route.endpoint, REQUIREMENT, None) is not None, route.path
            continue
        assert isinstance(route, Route), route
        for method in sorted((route.methods or set()) - {"HEAD"}):
            found.append((method, route.path, getattr(route.endpoint, REQUIREMENT, None)))
    return found


def bad_credentials(system: System) -> dict[str, tuple[tuple[str, str], ...]]:
    """Wrong in every way the issue names, each a separate attempt."""
    now = int(time.time())
    ours = TokenAuthority(system.gateway.keys)
    good = ours.issue(system.admin_id, role="admin", scopes=["admin"])
    head, body, signature = good.split(".")
    stranger = TokenAuthority(hmac_ring(b"another-secret-0123456789-abcdefghij"))
    claims = {"sub": system.admin_id, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 60}
    ring = system.gateway.keys
    secret = ring.signing_key
    assert isinstance(secret, bytes)
    header = {"alg": "HS256", "typ": "JWT", "kid": ring.signing_kid}

    def signed(**changes: Any) -> tuple[tuple[str, str], ...]:
        """Signed with our own secret, so only the claims are wrong."""
        body = {k: v for k, v in {**claims, **changes}.items() if v is not None}
        return (("authorization", f"Bearer {forge(header, body, secret)}"),)

    return {
        "none": (),
        "garbage bearer": (("authorization", "Bearer not-a-token"),),
        "wrong scheme": (("authorization", f"Basic {good}"),),
        "alg none": (("authorization", f"Bearer {forge({'alg': 'none'}, claims, None)}"),),
        "foreign signature": (
            ("authorization", f"Bearer {stranger.issue(system.admin_id, role='admin', scopes=[])}"),
        ),
        "tampered": (("authorization", f"Bearer {head}.{body[:-2]}xx.{signature}"),),
        "expired": (
            (
                "authorization",
                f"Bearer {ours.issue(system.admin_id, role='admin', scopes=[], now=now - 3600)}",
            ),
        ),
        "no exp": signed(exp=None),
        "no sub": signed(sub=None),
        "no iss": signed(iss=None),
        "no aud": signed(aud=None),
        "wrong audience": signed(aud="someone-else"),
        "issuer a prefix of ours": signed(iss=ISSUER[:-1]),
        "unknown kid": (
            ("authorization", f"Bearer {forge({**header, 'kid': 'nope'}, claims, secret)}"),
        ),
        "unknown user": signed(sub="0" * 32),
        "unknown api key": (("x-api-key", UNKNOWN_KEY),),
        "malformed api key": (("x-api-key", "gpuproxy_nope"),),
        "api key as bearer": (("authorization", f"Bearer {UNKNOWN_KEY}"),),
    }


@pytest.fixture
async def system(nats_url: str, migrated_database: str) -> AsyncIterator[System]:
    # Hundreds of bad credentials from one address would soon be refused 429 before they
    # are judged; counting them per address is test_key_guessing's subject, not this one's.
    async with running_system(nats_url, migrated_database, auth_attempts_per_minute=0) as running:
        yield running


def test_every_grpc_method_has_an_access_rule() -> None:
    missing = [path for path, _ in every_method() if path not in GRPC_METHODS]
    assert not missing, f"methods without an access rule in gateway/auth/policy.py: {missing}"
    stale = set(GRPC_METHODS) - {path for path, _ in every_method()}
    assert not stale, f"rules for methods that do not exist: {stale}"
    public = {path.rsplit("/", 1)[1] for path, rule in GRPC_METHODS.items() if rule.public}
    assert public == PUBLIC_GRPC


def test_every_http_route_is_made_through_the_guard_with_a_rule() -> None:
    routes = every_route()
    unguarded = [(m, p) for m, p, rule in routes if rule is None]
    assert not unguarded, f"routes not made through HttpGuard.route: {unguarded}"
    public = {(m, p) for m, p, rule in routes if rule is not None and rule.public}
    assert public == PUBLIC_HTTP


async def call_grpc(
    channel: grpc.aio.Channel, path: str, method: MethodDescriptor, metadata: Any
) -> grpc.StatusCode:
    empty = GetMessageClass(method.input_type)().SerializeToString()
    try:
        if method.client_streaming:
            # No request messages: the guard refuses before reading any, and a grpc.aio
            # client whose write races the server's early status reports INTERNAL instead
            # of that status (grpc/grpc#36066).
            call = channel.stream_stream(path)(iter(()), metadata=metadata, timeout=5)
            async for _ in call:
                break
            # A stream that ended without a reply still has its status.
            return cast(grpc.StatusCode, await call.code())
        if method.server_streaming:
            async for _ in channel.unary_stream(path)(empty, metadata=metadata, timeout=5):
                break
            return grpc.StatusCode.OK
        await channel.unary_unary(path)(empty, metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        if "A" * 43 in (exc.details() or ""):
            return grpc.StatusCode.DATA_LOSS  # the credential came back: fails the caller
        return exc.code()
    return grpc.StatusCode.OK


async def test_every_grpc_method_refuses_missing_and_bad_credentials(system: System) -> None:
    attempts = bad_credentials(system)
    async with grpc.aio.insecure_channel(system.grpc_target) as channel:
        for path, method in every_method():
            name = method.name
            for what, metadata in attempts.items():
                code = await call_grpc(channel, path, method, metadata)
                if name == "Login":
                    continue  # public, and refuses the empty email and password itself
                if name in PUBLIC_GRPC:
                    assert code != grpc.StatusCode.UNAUTHENTICATED, (name, what)
                else:
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (name, what, code)


async def test_every_http_route_refuses_missing_and_bad_credentials(system: System) -> None:
    attempts = bad_credentials(system)
    async with httpx.AsyncClient(base_url=system.http_base, timeout=10) as http:
        for method, path, _ in every_route():
            url = re.sub(r"\{[^}]+\}", "x0", path)
            for what, headers in attempts.items():
                answer = await http.request(method, url, headers=dict(headers), json={})
                if (method, path) in PUBLIC_HTTP:
                    # Sign-in routes refuse bad credentials themselves (401), or the
                    # address after too many attempts (429); health answers anyone.
                    assert answer.status_code not in (401, 429) or "auth" in path, (method, path)
                    continue
                assert answer.status_code == 401, (method, path, what, answer.text)
                error = answer.json()["error"]
                assert error["code"] == "unauthenticated"
                assert "A" * 43 not in answer.text


async def test_a_valid_credential_gets_past_the_guard_on_every_route(system: System) -> None:
    """The other half of the census: the admin's key is let through everywhere (an answer
    other than 401/403 comes from the handler itself)."""
    async with httpx.AsyncClient(
        base_url=system.http_base, timeout=10, headers={"x-api-key": system.api_key}
    ) as http:
        for method, path, rule in every_route():
            assert rule is not None
            if rule.public or rule.sessions_only:
                continue
            url = re.sub(r"\{[^}]+\}", "x0", path)
            answer = await http.request(method, url, json={})
            assert answer.status_code not in (401, 403), (method, path, answer.text)
