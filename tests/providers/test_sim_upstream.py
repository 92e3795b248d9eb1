"""The simulated inference server: deterministic tokens, OpenAI's shapes, latency, failures.

Every server here is a real `gpuproxy sim-upstream` process on a free port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulator import tokens
from simulator.upstream import DEFAULT_MODEL, EXIT_DIED
from tests.conftest import free_port

CHAT = {"messages": [{"role": "user", "content": "Tell me about rivers."}]}
PROMPT = {"prompt": "Once upon a time"}


class Server:
    """One `gpuproxy sim-upstream` process and its base URL."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gpuproxy", "sim-upstream", "--port", str(self.port), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        with httpx.Client(timeout=1) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(f"sim-upstream exited: {self.log.read_text()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        pytest.fail(f"sim-upstream did not answer: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


@contextmanager
def started(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = Server(args, log, env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The command alone (`--port N`), its owner given by the environment."""
    log = tmp_path_factory.mktemp("upstream") / "upstream.log"
    with started([], log, {"GPUPROXY_SIM_OWNER_PID": str(os.getpid())}) as server:
        yield server


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Refuses every second inference request; `slow` waits 300 ms."""
    log = tmp_path_factory.mktemp("failing") / "failing.log"
    args = ["--fail", "refuse", "--fail-rate", "0.5", "--slow-ms", "300", "--model", "sim-other"]
    with started([*args, "--owner-pid", str(os.getpid())], log) as server:
        yield server


@pytest.fixture
async def client(upstream: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream.url, timeout=10) as client:
        yield client


def data_lines(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


async def stream_lines(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    into: list[str],
    headers: dict[str, str] | None = None,
) -> None:
    """Collect the SSE lines of a streamed answer into `into`, as they come."""
    async with client.stream("POST", path, json=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            into.append(line)


# Tokens


def test_same_inputs_give_the_same_tokens() -> None:
    first = tokens.generate("m", "hello there", 40, seed=7)

    assert tokens.generate("m", "hello there", 40, seed=7) == first
    assert len(first) == 40
    assert first[0] in tokens.VOCABULARY
    assert all(piece.startswith(" ") and piece[1:] in tokens.VOCABULARY for piece in first[1:])


@pytest.mark.parametrize(
    ("model", "prompt", "seed"),
    [("m", "hello here", 7), ("m", "hello there", 8), ("other", "hello there", 7)],
)
def test_a_different_input_gives_different_tokens(model: str, prompt: str, seed: int) -> None:
    assert tokens.generate(model, prompt, 40, seed) != tokens.generate("m", "hello there", 40, 7)


def test_an_answer_ends_by_itself_below_a_large_max_tokens() -> None:
    natural = tokens.natural_length("m", "hi")

    assert tokens.NATURAL_LENGTH[0] <= natural <= tokens.NATURAL_LENGTH[1]
    assert len(tokens.generate("m", "hi", 4096)) == natural
    assert tokens.generate("m", "hi", 5) == tokens.generate("m", "hi", 4096)[:5]


def test_prompt_tokens_are_words_and_at_least_one() -> None:
    assert tokens.count_prompt_tokens("three little words") == 3
    assert tokens.count_prompt_tokens("") == 1


# Whole answers


async def test_the_command_alone_serves_its_default_model(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()

    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [DEFAULT_MODEL]
    assert models["data"][0]["object"] == "model"


async def test_a_chat_completion_is_shaped_like_openai(client: httpx.AsyncClient) -> None:
    answer = await client.post("/v1/chat/completions", json={**CHAT, "model": DEFAULT_MODEL})

    assert answer.status_code == 200
    body = answer.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == DEFAULT_MODEL
    [choice] = body["choices"]
    assert choice["index"] == 0
    expected = "".join(tokens.generate(DEFAULT_MODEL, "Tell me about rivers.", 16))
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}


async def test_a_text_completion_is_shaped_like_openai(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/completions", json={**PROMPT, "max_tokens": 3})).json()

    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["text"] == "".join(tokens.generate(DEFAULT_MODEL, "Once upon a time", 3))
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


async def test_the_same_request_gets_the_same_answer_and_a_seed_changes_it(
    client: httpx.AsyncClient,
) -> None:
    async def content(**extra: Any) -> str:
        body = (await client.post("/v1/chat/completions", json={**CHAT, **extra})).json()
        text: str = body["choices"][0]["message"]["content"]
        return text

    first = await content(seed=1)

    assert await content(seed=1) == first
    assert await content(seed=2) != first


async def test_an_answer_shorter_than_max_tokens_stops(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/completions", json={**PROMPT, "max_tokens": 4096})).json()

    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == tokens.natural_length(
        DEFAULT_MODEL, "Once upon a time"
    )


# Streamed answers


async def test_a_streamed_chat_is_shaped_like_openai(client: httpx.AsyncClient) -> None:
    lines: list[str] = []
    await stream_lines(
        client, "/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 5}, lines
    )

    *chunks, done = data_lines(lines)
    assert done == "[DONE]"
    parsed = [json.loads(chunk) for chunk in chunks]
    assert {chunk["object"] for chunk in parsed} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in parsed}) == 1
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in chunk["choices"][0]["delta"] for chunk in parsed[1:])
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in parsed)
    assert text == "".join(tokens.generate(DEFAULT_MODEL, "Tell me about rivers.", 5))
    assert [chunk["choices"][0]["finish_reason"] for chunk in parsed][-2:] == [None, "length"]
    assert parsed[-1]["choices"][0]["delta"] == {}
    assert all("usage" not in chunk for chunk in parsed)


async def test_include_usage_adds_a_last_chunk_without_choices(client: httpx.AsyncClient) -> None:
    body = {**PROMPT, "stream": True, "max_tokens": 4, "stream_options": {"include_usage": True}}
    lines: list[str] = []
    await stream_lines(client, "/v1/completions", body, lines)

    *chunks, done = data_lines(lines)
    parsed = [json.loads(chunk) for chunk in chunks]
    assert done == "[DONE]"
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    assert all(chunk["usage"] is None for chunk in parsed[:-1])
    assert {chunk["object"] for chunk in parsed} == {"text_completion"}
    assert "".join(chunk["choices"][0]["text"] for chunk in parsed[:-1]) == "".join(
        tokens.generate(DEFAULT_MODEL, "Once upon a time", 4)
    )
    assert parsed[-2]["choices"][0]["finish_reason"] == "length"


async def test_time_to_first_token_and_token_delay_are_honoured(
    client: httpx.AsyncClient,
) -> None:
    delays = {"x-sim-ttft-ms": "100", "x-sim-token-delay-ms": "50"}
    body = {**CHAT, "max_tokens": 5}

    began = time.monotonic()
    lines: list[str] = []
    await stream_lines(client, "/v1/chat/completions", {**body, "stream": True}, lines, delays)
    streamed = time.monotonic() - began
    began = time.monotonic()
    answer = await client.post("/v1/chat/completions", json=body, headers=delays)
    whole = time.monotonic() - began

    # 100 ms before the first token, then 4 x 50 ms.
    assert streamed >= 0.3
    assert whole >= 0.3
    assert answer.status_code == 200


# Failures


async def test_refuse_answers_503_with_an_openai_error(client: httpx.AsyncClient) -> None:
    answer = await client.post("/v1/chat/completions", json=CHAT, headers={"x-sim-fail": "refuse"})

    assert answer.status_code == 503
    error = answer.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["type"] == "server_error"


async def test_cut_ends_a_stream_without_final_chunk_or_done(
    client: httpx.AsyncClient,
) -> None:
    lines: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        await stream_lines(
            client,
            "/v1/chat/completions",
            {**CHAT, "stream": True},
            lines,
            {"x-sim-fail": "cut"},
        )

    chunks = data_lines(lines)
    assert "[DONE]" not in chunks
    assert all(json.loads(chunk)["choices"][0]["finish_reason"] is None for chunk in chunks)
    # The role chunk and the two tokens let through before the cut.
    assert len(chunks) == 3
    assert (await client.get("/health")).status_code == 200


async def test_cut_ends_a_whole_answer_short(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/v1/completions", json=PROMPT, headers={"x-sim-fail": "cut"})

    assert (await client.post("/v1/completions", json=PROMPT)).status_code == 200


async def test_die_ends_the_stream_and_the_process(tmp_path: Path) -> None:
    with started([], tmp_path / "die.log") as server:
        lines: list[str] = []
        body = {**PROMPT, "stream": True}
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await stream_lines(client, "/v1/completions", body, lines, {"x-sim-fail": "die"})

        assert len(data_lines(lines)) == 2
        assert server.process.wait(timeout=5) == EXIT_DIED


async def test_server_fail_mode_hits_its_fraction_of_requests(failing: Server) -> None:
    async with httpx.AsyncClient(base_url=failing.url, timeout=10) as client:
        statuses = [
            (await client.post("/v1/completions", json=PROMPT)).status_code for _ in range(4)
        ]
        spared = await client.post("/v1/completions", json=PROMPT, headers={"x-sim-fail": "none"})
        models = await client.get("/v1/models")

    assert statuses == [200, 503, 200, 503]
    assert spared.status_code == 200
    assert models.status_code == 200
    assert models.json()["data"][0]["id"] == "sim-other"


async def test_slow_waits_before_answering(failing: Server) -> None:
    async with httpx.AsyncClient(base_url=failing.url, timeout=10) as client:
        began = time.monotonic()
        answer = await client.post("/v1/completions", json=PROMPT, headers={"x-sim-fail": "slow"})

    assert time.monotonic() - began >= 0.3
    assert answer.status_code == 200


# Bad requests


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": DEFAULT_MODEL}, "messages"),
        ("/v1/chat/completions", {"messages": "hello"}, "messages"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {**PROMPT, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {**PROMPT, "max_tokens": "many"}, "max_tokens"),
        ("/v1/completions", {**PROMPT, "stream_options": {}}, "stream_options"),
    ],
)
async def test_a_bad_request_is_400_naming_the_field(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    answer = await client.post(path, json=body)

    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param
    assert param in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_a_body_that_is_not_json_is_400(client: httpx.AsyncClient) -> None:
    answer = await client.post("/v1/chat/completions", content=b"{not json")

    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_json"


async def test_a_bad_sim_header_is_400_naming_it(client: httpx.AsyncClient) -> None:
    answer = await client.post("/v1/completions", json=PROMPT, headers={"x-sim-fail": "explode"})

    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "x-sim-fail"


async def test_another_model_is_404_model_not_found(client: httpx.AsyncClient) -> None:
    answer = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})

    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "model_not_found"


# Lifetime


def test_the_server_exits_when_its_owner_has_ended(tmp_path: Path) -> None:
    owner = subprocess.Popen(["sleep", "60"])
    try:
        with started(["--owner-pid", str(owner.pid)], tmp_path / "owned.log") as server:
            owner.kill()
            owner.wait()

            assert server.process.wait(timeout=10) == 0
            assert "owner process" in server.log.read_text()
    finally:
        owner.kill()
        owner.wait()
