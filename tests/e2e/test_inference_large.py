"""Request bodies as large as the gateway reads: a 5 MB chat request with a base64 image goes
through the bus (larger than NATS's default payload, which the deployment raises with the
body limit); one over the limit is 413 in OpenAI's format, and nothing is published."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client

from bus.connection import connect
from gpuproxy.natsd import NatsServer, payload_limit
from schemas import topology
from schemas.subjects import WorkerKind
from simulator.upstream import DEFAULT_MODEL
from tests.e2e.machines import register, sdk, served, sim_machine
from tests.e2e.system import System, running_system

BODY_LIMIT = 16 * 1024 * 1024
"""`GPUPROXY_MAX_BODY_BYTES`'s default, which the test system's gateway keeps."""


@pytest.fixture
def roomy_nats(tmp_path: Path) -> Iterator[str]:
    """A nats-server sized for the gateway's body limit, as `gpuproxy up` starts it."""
    server = NatsServer(tmp_path / "js", max_payload=payload_limit(BODY_LIMIT))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
async def system(roomy_nats: str, migrated_database: str) -> AsyncIterator[System]:
    async with running_system(roomy_nats, migrated_database, kinds=(WorkerKind.PROXY,)) as s:
        yield s


async def commands_published(url: str) -> int:
    nc = await connect(url, name="test-count")
    try:
        return int((await nc.jetstream().stream_info(topology.COMMAND_STREAM)).state.last_seq)
    finally:
        await nc.close()


async def test_a_5_mb_chat_request_with_an_image_is_answered(
    system: System, roomy_nats: str, tmp_path: Path
) -> None:
    image = base64.b64encode(os.urandom(3_750_000)).decode()  # 5,000,000 characters
    nc: Client = await connect(roomy_nats, name="test-register")
    with sim_machine(tmp_path) as machine:
        await register(nc, machine, owner=system.admin_id)
        async with sdk(system, timeout=60) as client:
            await served(client, DEFAULT_MODEL)
            answer = await client.chat.completions.create(
                model=DEFAULT_MODEL,
                max_tokens=3,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is in this picture?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": f"data:image/png;base64,{image}"},
                            },
                        ],
                    }
                ],
            )
    await nc.close()
    assert answer.choices[0].message.content


async def test_a_body_over_the_limit_is_413_in_openai_shape_and_nothing_is_published(
    system: System, roomy_nats: str
) -> None:
    before = await commands_published(roomy_nats)
    async with httpx.AsyncClient(base_url=system.http_base, timeout=60) as http:
        answer = await http.post(
            "/v1/chat/completions",
            content=b'{"model": "m", "messages": [], "pad": "' + b"x" * BODY_LIMIT + b'"}',
            headers={"authorization": f"Bearer {system.api_key}"},
        )
    assert answer.status_code == 413
    assert answer.json()["error"]["param"] == "body"
    assert await commands_published(roomy_nats) == before
