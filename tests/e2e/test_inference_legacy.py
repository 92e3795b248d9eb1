"""The original inference routes: `POST /api/v1/gpu/proxy`, whole and streamed, and the
WebSocket `/ws` with several requests on one socket, told apart by `request_id`; a target
naming a host is refused before anything is published, and a client that closes its socket
stops the machine's work."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websockets
from nats.aio.client import Client
from websockets.asyncio.client import ClientConnection
from websockets.http11 import Response

from schemas import topology
from schemas.subjects import WorkerKind
from simulator.upstream import DEFAULT_MODEL
from tests.e2e.machines import register, served, sim_machine
from tests.e2e.system import System, running_system

MODEL = f"model://{DEFAULT_MODEL}/v1/chat/completions"
PROMPT = [{"role": "user", "content": "tell me about rivers"}]


@pytest.fixture
async def proxied(nats_url: str, migrated_database: str) -> AsyncIterator[System]:
    async with running_system(nats_url, migrated_database, kinds=(WorkerKind.PROXY,)) as system:
        yield system


@pytest.fixture
async def machine(proxied: System, nc: Client, tmp_path: Path) -> AsyncIterator[str]:
    """A quick machine serving the default model; yields its instance id."""
    with sim_machine(tmp_path, "--token-delay-ms", "5") as server:
        instance_id = await register(nc, server, owner=proxied.admin_id)
        await ready(proxied)
        yield instance_id


@pytest.fixture
async def http(proxied: System) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {proxied.api_key}"}
    async with httpx.AsyncClient(base_url=proxied.http_base, headers=headers, timeout=30) as client:
        yield client


async def ready(system: System) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{system.http_base}/v1", api_key=system.api_key, max_retries=0
    ) as client:
        await served(client, DEFAULT_MODEL)


def chat(words: int, **more: Any) -> dict[str, Any]:
    return {"messages": PROMPT, "max_tokens": words, **more}


def socket(system: System, *, key: bool = True, **options: Any) -> Any:
    headers = {"x-api-key": system.api_key} if key else {}
    url = f"ws://127.0.0.1:{system.gateway.http_port}/ws"
    return websockets.connect(
        options.pop("url", url), additional_headers=headers, proxy=None, **options
    )


async def refused(system: System, **options: Any) -> Response:
    """The gateway's answer to a handshake it refuses (one made without a key by default)."""
    with pytest.raises(websockets.InvalidStatus) as raised:
        await socket(system, key=options.pop("key", False), **options)
    return raised.value.response


async def frames(ws: ClientConnection, *, until: set[str]) -> list[dict[str, Any]]:
    """Frames as they come, until each request in `until` has ended (done or error)."""
    read: list[dict[str, Any]] = []
    waiting = set(until)
    while waiting:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        read.append(frame)
        if frame["type"] in ("done", "error"):
            waiting.discard(frame["request_id"])
    return read


def contents(events: str) -> str:
    """The text of a streamed chat answer's server-sent events."""
    text = []
    for line in events.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text)


async def commands_published(nc: Client) -> int:
    return (await nc.jetstream().stream_info(topology.COMMAND_STREAM)).state.last_seq


# POST /api/v1/gpu/proxy


@pytest.mark.parametrize("as_text", [False, True], ids=["object", "string"])
async def test_a_whole_request_is_answered_in_the_original_envelope(
    machine: str, http: httpx.AsyncClient, as_text: bool
) -> None:
    body = chat(6, seed=3)
    answer = await http.post(
        "/api/v1/gpu/proxy",
        json={"target_url": MODEL, "body": json.dumps(body) if as_text else body, "timeout": 20},
    )
    assert answer.status_code == 200, answer.text
    envelope = answer.json()
    assert envelope["status_code"] == 200
    assert int(envelope["headers"]["x-gpuproxy-cost-micros"]) > 0
    assert envelope["body"]["choices"][0]["message"]["content"]
    assert envelope["body"]["model"] == DEFAULT_MODEL


async def test_a_machines_refusal_is_relayed_inside_the_envelope(
    machine: str, http: httpx.AsyncClient
) -> None:
    answer = await http.post(
        "/api/v1/gpu/proxy",
        json={"target_url": f"instance://{machine}", "body": chat(2, messages="not a list")},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["status_code"] == 400
    assert "error" in answer.json()["body"]


async def test_a_streamed_request_is_relayed_as_server_sent_events(
    machine: str, http: httpx.AsyncClient
) -> None:
    whole = await http.post(
        "/api/v1/gpu/proxy", json={"target_url": MODEL, "body": chat(6, seed=3)}
    )
    streamed = await http.post(
        "/api/v1/gpu/proxy",
        json={"target_url": f"instance://{machine}", "body": chat(6, seed=3), "stream": True},
    )
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.rstrip().endswith("data: [DONE]")
    said = whole.json()["body"]["choices"][0]["message"]["content"]
    assert contents(streamed.text) == said


async def test_a_target_that_names_a_host_is_refused_and_nothing_is_published(
    machine: str, http: httpx.AsyncClient, nc: Client
) -> None:
    before = await commands_published(nc)
    for target in (
        "http://169.254.169.254/latest/meta-data",
        "https://example.com/v1/chat/completions",
        "10.0.0.7:8000/v1/chat/completions",
    ):
        answer = await http.post("/api/v1/gpu/proxy", json={"target_url": target, "body": chat(2)})
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert (error["code"], error["field"]) == ("invalid_argument", "target_url")
    assert await commands_published(nc) == before


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        ({"target_url": MODEL}, "body"),
        ({"body": chat(2)}, "target_url"),
        ({"target_url": MODEL, "body": "not json"}, "body"),
        ({"target_url": MODEL, "body": [1, 2]}, "body"),
        ({"target_url": MODEL, "body": chat(0)}, "max_tokens"),
        ({"target_url": MODEL, "body": chat(2, model="another")}, "model"),
        ({"target_url": MODEL, "body": chat(2, stream=False), "stream": True}, "stream"),
        ({"target_url": MODEL, "body": chat(2), "timeout": -1}, "timeout"),
        ({"target_url": MODEL, "body": chat(2), "protocol": "ftp"}, "protocol"),
        ({"target_url": MODEL, "body": chat(2), "method": "GET"}, "method"),
        ({"target_url": MODEL, "body": chat(2), "sudo": True}, "sudo"),
    ],
)
async def test_a_bad_request_is_refused_naming_the_field(
    proxied: System, http: httpx.AsyncClient, request_body: dict[str, Any], field: str
) -> None:
    answer = await http.post("/api/v1/gpu/proxy", json=request_body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_argument", field)


# /ws


async def test_the_socket_answers_ping_with_pong(proxied: System) -> None:
    async with socket(proxied) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}


async def test_a_streamed_request_comes_as_chunks_then_done(machine: str, proxied: System) -> None:
    request = {"type": "proxy", "request_id": "r1", "target_url": MODEL, "stream": True}
    async with socket(proxied) as ws:
        await ws.send(json.dumps({**request, "body": chat(6, seed=3)}))
        read = await frames(ws, until={"r1"})
        await ws.send(
            json.dumps({**request, "request_id": "r2", "stream": False, "body": chat(6, seed=3)})
        )
        (whole,) = await frames(ws, until={"r2"})

    *chunks, done = read
    assert {c["type"] for c in chunks} == {"chunk"}
    assert {c["request_id"] for c in chunks} == {"r1"}
    events = "".join(c["data"] for c in chunks)
    assert events.rstrip().endswith("data: [DONE]")
    assert done["type"] == "done"
    assert done["status_code"] == 200
    assert done["cost_micros"] > 0
    assert "body" not in done
    assert whole["type"] == "done"
    assert contents(events) == whole["body"]["choices"][0]["message"]["content"]


async def test_requests_on_one_socket_run_at_once_told_apart_by_request_id(
    machine: str, proxied: System
) -> None:
    async with socket(proxied) as ws:
        for name, words in (("long", 30), ("short", 2), ("bad", 0)):
            await ws.send(
                json.dumps(
                    {
                        "type": "proxy",
                        "request_id": name,
                        "target_url": MODEL,
                        "body": chat(words, stream=True),
                    }
                )
            )
        read = await frames(ws, until={"long", "short", "bad"})

    ends = [f["request_id"] for f in read if f["type"] in ("done", "error")]
    assert ends.index("short") < ends.index("long")  # not held behind the long one
    (bad,) = [f for f in read if f["request_id"] == "bad"]
    assert bad["type"] == "error"
    assert bad["error"]["field"] == "max_tokens"
    said = {
        name: contents(
            "".join(f["data"] for f in read if f["request_id"] == name and f["type"] == "chunk")
        )
        for name in ("long", "short")
    }
    assert len(said["short"].split()) <= 2 < len(said["long"].split())


async def test_a_bad_frame_is_answered_by_its_request_id_and_the_socket_goes_on(
    proxied: System,
) -> None:
    async with socket(proxied) as ws:
        await ws.send("not json")
        garbled = json.loads(await ws.recv())
        await ws.send(
            json.dumps(
                {"type": "proxy", "request_id": "h", "target_url": "http://10.0.0.1/", "body": {}}
            )
        )
        refused = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "shout", "request_id": "s"}))
        unknown = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "ping"}))
        pong = json.loads(await ws.recv())
    assert garbled["type"] == "error"
    assert garbled["request_id"] == ""
    assert (refused["request_id"], refused["error"]["field"]) == ("h", "target_url")
    assert (unknown["request_id"], unknown["error"]["field"]) == ("s", "type")
    assert pong == {"type": "pong"}


async def test_a_socket_without_a_credential_is_refused_at_the_handshake(proxied: System) -> None:
    refusal = await refused(proxied)
    assert refusal.status_code == 401
    assert json.loads(refusal.body)["error"]["code"] == "unauthenticated"


async def test_a_key_in_the_query_string_is_refused_and_never_logged(proxied: System) -> None:
    seen: list[str] = []

    class Remember(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Remember()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        url = f"ws://127.0.0.1:{proxied.gateway.http_port}/ws?api_key={proxied.api_key}"
        refusal = await refused(proxied, url=url)
    finally:
        logger.removeHandler(handler)
    assert refusal.status_code == 400
    assert json.loads(refusal.body)["error"]["field"] == "api_key"
    assert any("/ws" in line for line in seen)  # the handshake was logged, without its query
    assert not any(proxied.api_key in line for line in seen)


async def test_a_browser_passes_its_key_as_a_subprotocol(proxied: System) -> None:
    offered = ["gpuproxy", f"bearer.{proxied.api_key}"]
    async with socket(proxied, key=False, subprotocols=offered) as ws:
        assert ws.subprotocol == "gpuproxy"
        await ws.send(json.dumps({"type": "ping", "request_id": "p"}))
        assert json.loads(await ws.recv()) == {"type": "pong", "request_id": "p"}


async def test_a_client_closing_the_socket_mid_stream_closes_the_machines_connection(
    proxied: System, nc: Client, tmp_path: Path
) -> None:
    with sim_machine(tmp_path, "--token-delay-ms", "1000") as server:
        await register(nc, server, owner=proxied.admin_id)
        await ready(proxied)
        async with socket(proxied) as ws:
            await ws.send(
                json.dumps(
                    {
                        "type": "proxy",
                        "request_id": "slow",
                        "target_url": MODEL,
                        "body": chat(20, stream=True),
                    }
                )
            )
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert frame["type"] == "chunk", frame
                if contents(frame["data"]):
                    break
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as direct:
            for _ in range(250):
                stats = (await direct.get("/sim/stats")).json()
                if stats["disconnected"]:
                    break
                await asyncio.sleep(0.02)
    assert stats["disconnected"] == 1
    assert stats["completed"] == 0
