"""The simulated inference server's embeddings, Responses API, API key, KV cache, batch limit
and stats window.

Every server here is a real `gpuproxy sim-upstream` process on a free port, called over real
HTTP, with the official `openai` SDK where a client would use it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from simulator import tokens
from simulator.cache import PrefixCache
from simulator.upstream import DEFAULT_MODEL
from tests.providers.test_sim_upstream import Server, data_lines, started

KEY = "sk-sim-0123456789abcdef"
WRONG_KEY = "sk-sim-wrong-key-fedcba"
LONG_PROMPT = " ".join(f"word{index}" for index in range(40))


def owned(*args: str) -> list[str]:
    """The command's options for a server that ends with this test process."""
    return [*args, "--owner-pid", str(os.getpid())]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("plain") / "upstream.log"
    with started(owned(), log) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Its key comes from the environment, so it is in no process list."""
    log = tmp_path_factory.mktemp("keyed") / "upstream.log"
    with started(owned(), log, {"GPUPROXY_SIM_API_KEY": KEY}) as server:
        yield server


@pytest.fixture
def sdk(plain: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{plain.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def stats(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.url}/sim/stats").json()
    return body


def sse_events(lines: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a Responses stream."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert name is not None, f"data without an event line: {line}"
            events.append((name, json.loads(line.removeprefix("data: "))))
            name = None
    return events


async def first_token_seconds(client: httpx.AsyncClient, prompt: str) -> tuple[float, int]:
    """Seconds until a streamed completion's first token, and its cached tokens."""
    body = {
        "prompt": prompt,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    began = time.monotonic()
    first = None
    cached = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if first is None and chunk["choices"]:
                first = time.monotonic() - began
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first is not None
    assert cached is not None
    return first, cached


# Embeddings


def test_embeddings_are_unit_vectors_shaped_like_openai(plain: Server) -> None:
    body = {"input": ["a quiet river", "a loud city street"], "model": DEFAULT_MODEL}

    answer = httpx.post(f"{plain.url}/v1/embeddings", json=body)
    again = httpx.post(f"{plain.url}/v1/embeddings", json={"input": "a quiet river"})

    assert answer.status_code == 200
    result = answer.json()
    assert result["object"] == "list"
    assert result["model"] == DEFAULT_MODEL
    assert result["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    first, second = result["data"]
    assert [first["object"], first["index"], second["index"]] == ["embedding", 0, 1]
    assert len(first["embedding"]) == 8
    assert math.isclose(math.fsum(x * x for x in first["embedding"]), 1.0, rel_tol=1e-5)
    assert first["embedding"] != second["embedding"]
    assert again.json()["data"][0]["embedding"] == first["embedding"]


def test_base64_embeddings_carry_the_same_floats(plain: Server) -> None:
    body = {"input": "hello there", "dimensions": 16}

    floats = httpx.post(f"{plain.url}/v1/embeddings", json=body).json()["data"][0]["embedding"]
    encoded = httpx.post(
        f"{plain.url}/v1/embeddings", json={**body, "encoding_format": "base64"}
    ).json()["data"][0]["embedding"]

    assert len(floats) == 16
    assert list(struct.unpack("<16f", base64.b64decode(encoded))) == floats


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": DEFAULT_MODEL}, "input"),
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": []}, "input"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": 65}, "dimensions"),
        ({"input": "x", "dimensions": "eight"}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_a_bad_embeddings_request_is_400_naming_the_field(
    plain: Server, body: dict[str, Any], param: str
) -> None:
    answer = httpx.post(f"{plain.url}/v1/embeddings", json=body)

    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param


def test_embeddings_of_another_model_are_404(plain: Server) -> None:
    answer = httpx.post(f"{plain.url}/v1/embeddings", json={"input": "x", "model": "ada"})

    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "model_not_found"


def test_embeddings_fail_as_the_sim_headers_say(plain: Server) -> None:
    url = f"{plain.url}/v1/embeddings"

    refused = httpx.post(url, json={"input": "x"}, headers={"x-sim-fail": "refuse"})
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(url, json={"input": "x"}, headers={"x-sim-fail": "cut"})

    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "service_unavailable"


def test_the_openai_sdk_reads_embeddings(sdk: openai.OpenAI) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes it.
    default = sdk.embeddings.create(model=DEFAULT_MODEL, input=["one", "two"], dimensions=4)
    floats = sdk.embeddings.create(model=DEFAULT_MODEL, input="one", encoding_format="float")

    assert [len(item.embedding) for item in default.data] == [4, 4]
    assert default.usage.prompt_tokens == 2
    assert len(floats.data[0].embedding) == 8
    assert floats.data[0].embedding[:4] != default.data[0].embedding


# Responses API


def test_a_response_is_shaped_like_openai(plain: Server) -> None:
    body = {"input": "Tell me about rivers.", "instructions": "Be brief.", "store": False}

    answer = httpx.post(f"{plain.url}/v1/responses", json=body)

    assert answer.status_code == 200
    result = answer.json()
    assert result["id"].startswith("resp_")
    assert result["object"] == "response"
    assert isinstance(result["created_at"], int)
    assert result["model"] == DEFAULT_MODEL
    # The default 16 output tokens cut every answer (they run 32 tokens or more).
    assert result["status"] == "incomplete"
    assert result["incomplete_details"] == {"reason": "max_output_tokens"}
    [message] = result["output"]
    assert message["type"] == "message"
    assert message["id"].startswith("msg_")
    assert message["role"] == "assistant"
    text = "".join(tokens.generate(DEFAULT_MODEL, "Be brief.\nTell me about rivers.", 16))
    assert message["status"] == "incomplete"
    assert message["content"] == [
        {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    ]
    assert result["usage"] == {
        "input_tokens": 6,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 16,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 22,
    }


def test_a_response_that_ends_by_itself_is_completed(plain: Server) -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Once upon a time"}]}]

    result = httpx.post(
        f"{plain.url}/v1/responses", json={"input": items, "max_output_tokens": 4096}
    ).json()

    assert result["status"] == "completed"
    assert result["incomplete_details"] is None
    assert result["output"][0]["status"] == "completed"
    expected = tokens.natural_length(DEFAULT_MODEL, "Once upon a time")
    assert result["usage"]["output_tokens"] == expected


async def test_a_streamed_response_sends_openai_events_in_order(plain: Server) -> None:
    body = {"input": "Once upon a time", "max_output_tokens": 4, "stream": True}
    async with (
        httpx.AsyncClient(base_url=plain.url, timeout=10) as client,
        client.stream("POST", "/v1/responses", json=body) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines()]

    events = sse_events(lines)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        # Cut by max_output_tokens, OpenAI ends with "incomplete" rather than "completed".
        "response.incomplete",
    ]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert "[DONE]" not in "".join(lines)
    text = "".join(tokens.generate(DEFAULT_MODEL, "Once upon a time", 4))
    assert "".join(data["delta"] for name, data in events if name.endswith(".delta")) == text
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == text
    assert events[-1][1]["response"]["usage"]["output_tokens"] == 4
    assert events[0][1]["response"]["status"] == "in_progress"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi", "store": True}, "store"),
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"instructions": "Be brief."}, "input"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"type": "function_call_output", "role": "tool"}]}, "input[0]"),
    ],
)
def test_a_bad_response_request_is_400_naming_the_field(
    plain: Server, body: dict[str, Any], param: str
) -> None:
    answer = httpx.post(f"{plain.url}/v1/responses", json=body)

    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param


def test_the_openai_sdk_reads_a_response(sdk: openai.OpenAI) -> None:
    response = sdk.responses.create(
        model=DEFAULT_MODEL,
        input=[{"role": "user", "content": "Once upon a time"}],
        max_output_tokens=4096,
        store=False,
    )

    assert response.status == "completed"
    expected = tokens.generate(DEFAULT_MODEL, "Once upon a time", 4096)
    assert response.output_text == "".join(expected)
    assert response.usage is not None
    assert response.usage.output_tokens == len(expected)
    assert response.usage.input_tokens_details.cached_tokens == 0


def test_the_openai_sdk_reads_a_streamed_response(sdk: openai.OpenAI) -> None:
    stream = sdk.responses.create(
        model=DEFAULT_MODEL, input="Once upon a time", max_output_tokens=4096, stream=True
    )
    events = list(stream)

    assert events[0].type == "response.created"
    last = events[-1]
    assert last.type == "response.completed"
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == "".join(tokens.generate(DEFAULT_MODEL, "Once upon a time", 4096))
    assert last.response.output_text == deltas
    assert last.response.usage is not None
    assert last.response.usage.total_tokens == last.response.usage.output_tokens + 4


def test_the_openai_sdk_still_reads_chat_and_completions(sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Tell me about rivers."}]
    expected = "".join(tokens.generate(DEFAULT_MODEL, "Tell me about rivers.", 5))

    chat = sdk.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=5)
    chunks = list(
        sdk.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=5, stream=True
        )
    )
    text = sdk.completions.create(model=DEFAULT_MODEL, prompt="Tell me about rivers.", max_tokens=5)
    pieces = list(
        sdk.completions.create(
            model=DEFAULT_MODEL, prompt="Tell me about rivers.", max_tokens=5, stream=True
        )
    )

    assert chat.choices[0].message.content == expected
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert text.choices[0].text == expected
    assert "".join(piece.choices[0].text for piece in pieces) == expected


# API key


@pytest.mark.parametrize("authorization", [None, f"Bearer {WRONG_KEY}", KEY])
def test_a_missing_or_wrong_key_is_401_naming_neither_key(
    keyed: Server, authorization: str | None
) -> None:
    headers = {"authorization": authorization} if authorization else {}

    answers = [
        httpx.post(f"{keyed.url}/v1/chat/completions", json={"messages": []}, headers=headers),
        httpx.get(f"{keyed.url}/v1/models", headers=headers),
        httpx.post(f"{keyed.url}/v1/embeddings", json={"input": "x"}, headers=headers),
    ]

    for answer in answers:
        assert answer.status_code == 401
        assert answer.json() == {
            "error": {
                "message": "Incorrect API key provided.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        assert KEY not in answer.text
        assert WRONG_KEY not in answer.text


def test_the_right_key_opens_v1_and_health_and_stats_need_none(keyed: Server) -> None:
    with openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0) as client:
        response = client.responses.create(model=DEFAULT_MODEL, input="hi")
        models = client.models.list()
    with (
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=WRONG_KEY, max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError),
    ):
        wrong.models.list()

    assert response.output_text
    assert [model.id for model in models] == [DEFAULT_MODEL]
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    assert httpx.get(f"{keyed.url}/sim/stats").status_code == 200


def test_the_key_can_be_given_as_a_flag(tmp_path: Path) -> None:
    with started(owned("--api-key", KEY), tmp_path / "flag.log") as server:
        refused = httpx.get(f"{server.url}/v1/models")
        allowed = httpx.get(f"{server.url}/v1/models", headers={"authorization": f"Bearer {KEY}"})

    assert refused.status_code == 401
    assert allowed.status_code == 200
    assert KEY not in server.log.read_text()


# KV cache


def test_cache_blocks_chain_so_only_a_shared_prefix_hits() -> None:
    cache = PrefixCache(capacity=100, block_tokens=4)
    prompt = [f"w{index}" for index in range(10)]
    cache.store(prompt)

    assert cache.cached_tokens(prompt) == 8  # two full blocks; the partial third is not kept
    assert cache.cached_tokens([*prompt[:8], "other", "words"]) == 8
    assert cache.cached_tokens(["changed", *prompt[1:]]) == 0
    assert cache.cached_tokens(prompt[4:]) == 0


def test_the_cache_evicts_the_least_recently_used_blocks_tail_first() -> None:
    cache = PrefixCache(capacity=3, block_tokens=2)
    first = ["a", "b", "c", "d", "e", "f", "g", "h"]
    second = ["p", "q", "r", "s"]

    cache.store(first)
    kept_of_first = cache.cached_tokens(first)
    cache.store(second)

    # Four blocks into three places: the tail went, the prefix stayed.
    assert kept_of_first == 6
    assert len(cache) == 3
    assert cache.cached_tokens(second) == 4
    assert cache.cached_tokens(first) == 2


def test_no_cache_blocks_cache_nothing() -> None:
    cache = PrefixCache(capacity=0, block_tokens=2)
    cache.store(["a", "b", "c", "d"])

    assert cache.cached_tokens(["a", "b", "c", "d"]) == 0


def test_a_repeated_prompt_reports_cached_tokens(tmp_path: Path) -> None:
    args = owned("--cache-blocks", "64", "--block-tokens", "16")
    chat = {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 2}
    with started(args, tmp_path / "cache.log") as server:
        cold = httpx.post(f"{server.url}/v1/chat/completions", json=chat).json()
        warm = httpx.post(f"{server.url}/v1/chat/completions", json=chat).json()
        text = httpx.post(f"{server.url}/v1/completions", json={"prompt": LONG_PROMPT}).json()
        response = httpx.post(f"{server.url}/v1/responses", json={"input": LONG_PROMPT}).json()
        seen = stats(server)

    assert cold["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    # 40 tokens: two full blocks of 16 are cached, the last 8 never are.
    assert warm["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert warm["usage"]["prompt_tokens"] == 40
    assert text["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    assert response["usage"]["input_tokens_details"]["cached_tokens"] == 32
    assert seen["cached_tokens"] == 96
    assert seen["prompt_tokens"] == 160


def test_the_cache_forgets_what_it_had_no_room_for(tmp_path: Path) -> None:
    args = owned("--cache-blocks", "2", "--block-tokens", "4")
    first = " ".join(["alpha"] * 8)
    second = " ".join(["beta"] * 8)
    with started(args, tmp_path / "small.log") as server:

        def cached(prompt: str) -> int:
            usage = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt}).json()
            count: int = usage["usage"]["prompt_tokens_details"]["cached_tokens"]
            return count

        seen = [cached(first), cached(first), cached(second), cached(first)]

    assert seen == [0, 8, 0, 0]


async def test_a_cached_prompt_gets_its_first_token_sooner(tmp_path: Path) -> None:
    # 300 uncached tokens at 2 ms each is 600 ms of prefill; cached, 12 of them are left.
    prompt = " ".join(f"token{index}" for index in range(300))
    args = owned("--cache-blocks", "1024", "--prefill-us-per-token", "2000")
    with started(args, tmp_path / "prefill.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            cold, cold_cached = await first_token_seconds(client, prompt)
            warm, warm_cached = await first_token_seconds(client, prompt)

    assert cold_cached == 0
    assert warm_cached == 288
    assert warm < cold


# Batch limit


async def test_a_full_batch_makes_the_next_request_wait_its_turn(tmp_path: Path) -> None:
    # Each request holds its place ~300 ms; unqueued, b's first token would come 100 ms after
    # it was sent, while a still runs; queued, it comes 100 ms after a's last token.
    args = owned("--max-batch", "1", "--ttft-ms", "100", "--token-delay-ms", "100")
    log: list[str] = []

    async def generate(client: httpx.AsyncClient, name: str, started_first: asyncio.Event) -> None:
        body = {"prompt": f"request {name}", "max_tokens": 3, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and f"{name} first token" not in log:
                    log.append(f"{name} first token")
                    started_first.set()
        log.append(f"{name} done")

    with started(args, tmp_path / "batch.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            a_started, b_started = asyncio.Event(), asyncio.Event()
            first = asyncio.create_task(generate(client, "a", a_started))
            await a_started.wait()
            second = asyncio.create_task(generate(client, "b", b_started))
            await asyncio.gather(first, second)

    assert log == ["a first token", "a done", "b first token", "b done"]


# Stats


async def test_stats_count_what_the_server_saw(tmp_path: Path) -> None:
    with started(owned(), tmp_path / "stats.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            before = (await client.get("/sim/stats")).json()
            await client.post("/v1/completions", json={"prompt": "one two three"})
            await client.post("/v1/responses", json={"input": "four five", "stream": True})
            await client.post("/v1/embeddings", json={"input": "six"})
            await client.post(
                "/v1/completions", json={"prompt": "x"}, headers={"x-sim-fail": "refuse"}
            )
            after = (await client.get("/sim/stats")).json()

    assert before == {
        "requests": 0,
        "in_flight": 0,
        "completed": 0,
        "disconnected": 0,
        "last_disconnect_at": None,
        "cached_tokens": 0,
        "prompt_tokens": 0,
    }
    assert after == {**before, "requests": 4, "completed": 3, "prompt_tokens": 6}


async def test_a_client_that_leaves_mid_stream_is_noticed_at_once(tmp_path: Path) -> None:
    body = {"prompt": "Once upon a time", "stream": True, "max_tokens": 10}
    slow = {"x-sim-token-delay-ms": "1000"}
    with started(owned(), tmp_path / "leave.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            async with client.stream("POST", "/v1/completions", json=body, headers=slow) as answer:
                async for line in answer.aiter_lines():
                    if data_lines([line]):
                        break
            left_at = time.time()
            # The stream's next token is a second away; the server must not wait for it.
            deadline = time.monotonic() + 0.3
            seen = (await client.get("/sim/stats")).json()
            while seen["disconnected"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                seen = (await client.get("/sim/stats")).json()

    assert seen["disconnected"] == 1
    assert seen["in_flight"] == 0
    assert seen["completed"] == 0
    assert seen["last_disconnect_at"] >= left_at - 1


async def test_a_client_that_leaves_a_whole_answer_is_counted(tmp_path: Path) -> None:
    with started(owned("--ttft-ms", "5000"), tmp_path / "whole.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json={"prompt": "hi"}, timeout=0.2)
            deadline = time.monotonic() + 5
            seen = (await client.get("/sim/stats")).json()
            while seen["disconnected"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                seen = (await client.get("/sim/stats")).json()

    assert seen["disconnected"] == 1
    assert seen["in_flight"] == 0
