"""The HTTP front door over a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from schemas.subjects import WorkerKind
from tests.e2e.system import running_system


@pytest.fixture
async def http(nats_url: str, migrated_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        running_system(nats_url, migrated_database) as system,
        httpx.AsyncClient(
            base_url=system.http_base, timeout=10, headers={"x-api-key": system.api_key}
        ) as client,
    ):
        yield client


async def test_liveness_answers_ok(http: httpx.AsyncClient) -> None:
    answer = await http.get("/healthz")
    assert (answer.status_code, answer.json()) == (200, {"status": "ok"})


async def test_readiness_is_ready_when_every_part_answers(http: httpx.AsyncClient) -> None:
    answer = await http.get("/readyz")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ready"
    assert body["details"] == {"nats": "ok", "jetstream": "ok", "database": "ok"}


async def test_health_reports_details(http: httpx.AsyncClient) -> None:
    answer = await http.get("/health")
    assert answer.status_code == 200
    assert answer.json()["status"] == "healthy"
    assert all(f"worker.{kind}" in answer.json()["details"] for kind in WorkerKind)


async def test_ping_round_trips_to_the_named_worker_kind(http: httpx.AsyncClient) -> None:
    answer = await http.post("/api/v1/ping", json={"message": "hi", "worker_kind": "proxy"})
    assert answer.status_code == 200
    body = answer.json()
    assert (body["message"], body["worker_kind"], body["attempt"]) == ("hi", "proxy", 1)


async def test_same_idempotency_key_header_returns_the_first_answer(
    http: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "http-key-1"}
    first = await http.post("/api/v1/ping", json={"message": "a"}, headers=headers)
    again = await http.post("/api/v1/ping", json={"message": "a"}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()


async def test_an_idempotency_key_reused_for_another_body_gets_409_naming_the_key(
    http: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "http-key-2"}
    first = await http.post("/api/v1/ping", json={"message": "a"}, headers=headers)
    other = await http.post("/api/v1/ping", json={"message": "b"}, headers=headers)
    assert first.status_code == 200
    assert other.status_code == 409
    error = other.json()["error"]
    assert (error["code"], error["field"]) == ("failed_precondition", "idempotency-key")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"delay_ms": "soon"}', "delay_ms"),
        (b'{"worker_kind": "gpu"}', "worker_kind"),
        (b'{"delay_ms": 99999}', "delay_ms"),
        (b'{"colour": "red"}', "colour"),
        (b"{not json", "body"),
    ],
)
async def test_bad_input_gets_400_with_a_json_body_naming_the_field(
    http: httpx.AsyncClient, body: bytes, field: str
) -> None:
    answer = await http.post("/api/v1/ping", content=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_argument", field)


async def test_unknown_routes_and_methods_get_json_errors(http: httpx.AsyncClient) -> None:
    missing = await http.get("/api/v1/nothing")
    wrong = await http.get("/api/v1/ping")
    assert missing.status_code == 404
    assert wrong.status_code == 405
    assert missing.json()["error"]["message"]
