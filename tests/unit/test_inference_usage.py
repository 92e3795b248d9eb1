"""The usage meter: reported usage taken as it is, counted usage when none comes (only what
was delivered), and the helpers that ask an upstream for usage without the client noticing.

Chat and completions are read from a real `gpuproxy sim-upstream` process; the responses and
embeddings dialects, which the simulator does not serve, from OpenAI's documented shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas.inference import Api, Usage
from simulator import tokens
from simulator.upstream import DEFAULT_MODEL
from tests.conftest import free_port
from workers.proxy.usage import (
    UsageMeter,
    ask_for_usage,
    client_view,
    estimate_tokens,
    is_usage_only_chunk,
    prompt_text,
)

QUESTION = "Tell me about rivers and the valleys they carve."
CHAT = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": QUESTION}]}
COMPLETION = {"model": DEFAULT_MODEL, "prompt": QUESTION}
ANSWER = tokens.generate(DEFAULT_MODEL, QUESTION, 16)
"""What the simulator answers both requests (its default `max_tokens` is 16)."""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real simulated inference server; its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "upstream.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gpuproxy", "sim-upstream", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "GPUPROXY_SIM_OWNER_PID": str(os.getpid())},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"sim-upstream exited: {log.read_text()}")
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    pytest.fail(f"sim-upstream did not answer: {log.read_text()}")


def stream_events(
    url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """Each server-sent event's JSON, as it arrives."""
    with (
        httpx.Client(base_url=url, timeout=10) as client,
        client.stream("POST", path, json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line.removeprefix("data: "))


def relay(
    url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[UsageMeter, list[dict[str, Any]], list[dict[str, Any]]]:
    """What the proxy does with a stream: ask for usage, meter every event, pass on the client's
    view. The meter, the events as sent, and what the client received (until a cut, if any)."""
    api = Api.CHAT if path.endswith("chat/completions") else Api.COMPLETIONS
    meter = UsageMeter(prompt_text(api, body))
    client_asked = ask_for_usage(body)
    sent: list[dict[str, Any]] = []
    received: list[dict[str, Any]] = []
    try:
        for payload in stream_events(url, path, body, headers):
            sent.append(payload)
            meter.feed_event(payload)
            if client_asked:
                received.append(payload)
            elif not is_usage_only_chunk(payload):
                received.append(client_view(payload))
    except httpx.RemoteProtocolError:
        pass
    return meter, sent, received


def delivered_text(events: list[dict[str, Any]]) -> str:
    text = ""
    for event in events:
        for choice in event["choices"]:
            text += choice["delta"].get("content", "") if "delta" in choice else choice["text"]
    return text


# Against a real upstream


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
)
def test_a_stream_is_metered_from_the_usage_chunk_the_client_never_sees(
    upstream: str, path: str, body: dict[str, Any]
) -> None:
    meter, sent, received = relay(upstream, path, {**body, "stream": True})

    assert meter.usage() == Usage(
        input_tokens=tokens.count_prompt_tokens(QUESTION),
        output_tokens=len(ANSWER),
        estimated=False,
    )
    assert is_usage_only_chunk(sent[-1])
    assert all("usage" in event for event in sent)
    # The client sees the answer as if nobody had asked for usage.
    assert all("usage" not in event for event in received)
    assert len(received) == len(sent) - 1
    assert delivered_text(received) == "".join(ANSWER)


def test_a_client_that_asked_for_usage_receives_it_unchanged(upstream: str) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}

    meter, sent, received = relay(upstream, "/v1/chat/completions", body)

    assert received == sent
    assert received[-1]["usage"]["completion_tokens"] == len(ANSWER)
    assert not meter.usage().estimated


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
)
def test_a_whole_answer_is_metered_from_its_usage(
    upstream: str, path: str, body: dict[str, Any]
) -> None:
    meter = UsageMeter(QUESTION)
    with httpx.Client(base_url=upstream, timeout=10) as client:
        meter.feed_body(client.post(path, json=body).json())

    assert meter.usage() == Usage(
        input_tokens=tokens.count_prompt_tokens(QUESTION),
        output_tokens=len(ANSWER),
        estimated=False,
    )


def test_a_cut_stream_is_estimated_from_what_was_delivered_only(upstream: str) -> None:
    # The simulator lets two tokens through, then drops the connection: no usage chunk.
    meter, _, received = relay(
        upstream, "/v1/chat/completions", {**CHAT, "stream": True}, {"x-sim-fail": "cut"}
    )

    delivered = ANSWER[:2]
    assert delivered_text(received) == "".join(delivered)
    assert meter.usage() == Usage(
        input_tokens=estimate_tokens(QUESTION),
        output_tokens=sum(estimate_tokens(piece) for piece in delivered),
        estimated=True,
    )


def test_an_upstream_that_refuses_the_request_costs_nothing(upstream: str) -> None:
    meter = UsageMeter(QUESTION)
    with httpx.Client(base_url=upstream, timeout=10) as client:
        answer = client.post("/v1/chat/completions", json=CHAT, headers={"x-sim-fail": "refuse"})
    assert answer.status_code == 503

    meter.feed_body(answer.json())

    assert meter.usage() == Usage(estimated=True)


def test_a_request_that_ends_before_any_answer_counts_its_prompt() -> None:
    # Cancelled while the machine read the prompt: that work was done.
    assert UsageMeter(QUESTION).usage() == Usage(
        input_tokens=estimate_tokens(QUESTION), estimated=True
    )


# The estimator


@pytest.mark.parametrize(
    ("text", "count"), [("", 0), ("a", 1), (" the", 1), ("rivers", 2), ("x" * 400, 100)]
)
def test_a_piece_of_text_counts_one_token_per_started_four_characters(
    text: str, count: int
) -> None:
    assert estimate_tokens(text) == count


def test_a_stream_without_usage_counts_every_generated_piece() -> None:
    meter = UsageMeter("hello")
    for delta in [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {"reasoning_content": "think"},
        {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a":1}'}}]},
        {"content": None},
    ]:
        meter.feed_event({"object": "chat.completion.chunk", "choices": [{"delta": delta}]})

    assert meter.usage() == Usage(input_tokens=2, output_tokens=1 + 2 + 2, estimated=True)


# Usage reports


def chat_chunk(content: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        "usage": usage,
    }


def test_cached_prompt_tokens_are_taken_from_the_report() -> None:
    meter = UsageMeter(QUESTION)
    meter.feed_event(chat_chunk("Hi"))
    meter.feed_event(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 1200,
                "completion_tokens": 7,
                "prompt_tokens_details": {"cached_tokens": 1024},
            },
        }
    )

    assert meter.usage() == Usage(
        input_tokens=1200, cached_tokens=1024, output_tokens=7, estimated=False
    )


def test_running_totals_on_every_chunk_leave_the_last_one() -> None:
    # vLLM with `continuous_usage_stats`: cut after the second chunk, its total stands.
    meter = UsageMeter(QUESTION)
    meter.feed_event(chat_chunk("a", {"prompt_tokens": 9, "completion_tokens": 1}))
    meter.feed_event(chat_chunk("b", {"prompt_tokens": 9, "completion_tokens": 2}))

    assert meter.usage() == Usage(input_tokens=9, output_tokens=2, estimated=False)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": "9", "completion_tokens": 2},
        {"prompt_tokens": -1, "completion_tokens": 2},
        {"prompt_tokens": 9, "completion_tokens": None},
        {"total_tokens": 11},
        {},
    ],
)
def test_a_report_that_makes_no_sense_is_ignored_for_an_estimate(usage: dict[str, Any]) -> None:
    meter = UsageMeter("abcdefgh")
    meter.feed_event(chat_chunk("abcd", usage))

    assert meter.usage() == Usage(input_tokens=2, output_tokens=1, estimated=True)


def test_cached_tokens_never_exceed_the_input_and_null_details_mean_none() -> None:
    over = UsageMeter()
    over.feed_body(
        {
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 8},
            }
        }
    )
    null = UsageMeter()
    null.feed_body(
        {"usage": {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": None}}
    )

    assert over.usage().cached_tokens == 5
    assert null.usage().cached_tokens == 0


# The responses API


def responses_stream(pieces: list[str], usage: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Events of a responses stream as OpenAI sends them; `usage` None: cut before the end."""
    head = {"id": "resp_1", "object": "response", "status": "in_progress", "usage": None}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "sequence_number": 0, "response": head},
        {"type": "response.in_progress", "sequence_number": 1, "response": head},
        {
            "type": "response.content_part.added",
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
    ]
    events += [
        {"type": "response.output_text.delta", "item_id": "msg_1", "delta": piece}
        for piece in pieces
    ]
    if usage is not None:
        events += [
            {"type": "response.output_text.done", "text": "".join(pieces)},
            {
                "type": "response.completed",
                "response": {**head, "status": "completed", "error": None, "usage": usage},
            },
        ]
    return events


RESPONSES_USAGE = {
    "input_tokens": 36,
    "input_tokens_details": {"cached_tokens": 32},
    "output_tokens": 87,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 123,
}


def test_a_responses_stream_is_metered_from_its_completed_event() -> None:
    meter = UsageMeter(QUESTION)
    for event in responses_stream(ANSWER, RESPONSES_USAGE):
        meter.feed_event(event)

    assert meter.usage() == Usage(
        input_tokens=36, cached_tokens=32, output_tokens=87, estimated=False
    )


def test_a_cut_responses_stream_counts_its_text_deltas_only() -> None:
    meter = UsageMeter(QUESTION)
    for event in responses_stream(ANSWER[:3], None):
        meter.feed_event(event)

    assert meter.usage() == Usage(
        input_tokens=estimate_tokens(QUESTION),
        output_tokens=sum(estimate_tokens(piece) for piece in ANSWER[:3]),
        estimated=True,
    )


def test_a_whole_responses_answer_is_metered_from_its_usage_or_its_output() -> None:
    body: dict[str, Any] = {
        "object": "response",
        "status": "completed",
        "error": None,
        "output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Thinking"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Rivers carve", "annotations": []}],
            },
            {"type": "function_call", "name": "lookup", "arguments": '{"q":"x"}'},
        ],
        "usage": RESPONSES_USAGE,
    }
    reported = UsageMeter(QUESTION)
    reported.feed_body(body)
    unreported = UsageMeter(QUESTION)
    unreported.feed_body({**body, "usage": None})

    assert reported.usage() == Usage(
        input_tokens=36, cached_tokens=32, output_tokens=87, estimated=False
    )
    assert unreported.usage() == Usage(
        input_tokens=estimate_tokens(QUESTION), output_tokens=2 + 3 + 3, estimated=True
    )


def test_an_error_event_before_any_text_costs_nothing() -> None:
    meter = UsageMeter(QUESTION)
    meter.feed_event({"type": "error", "code": "server_error", "message": "overloaded"})

    assert meter.usage() == Usage(estimated=True)


def test_text_delivered_before_an_error_event_still_counts() -> None:
    meter = UsageMeter("abcd")
    meter.feed_event(chat_chunk("abcdefgh"))
    meter.feed_event({"error": {"message": "upstream failed", "type": "server_error"}})

    assert meter.usage() == Usage(input_tokens=1, output_tokens=2, estimated=True)


# Embeddings


def test_embeddings_count_their_input_and_no_output() -> None:
    body = {"input": ["first text", "second"]}
    reported = UsageMeter(prompt_text(Api.EMBEDDINGS, body))
    reported.feed_body(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        }
    )
    unreported = UsageMeter(prompt_text(Api.EMBEDDINGS, body))
    unreported.feed_body({"object": "list", "data": []})

    assert reported.usage() == Usage(input_tokens=4, estimated=False)
    assert unreported.usage() == Usage(
        input_tokens=estimate_tokens("first text\nsecond"), estimated=True
    )


# The prompt's text


def test_a_chat_prompt_is_its_message_strings_and_text_parts() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
        ]
    }

    assert prompt_text(Api.CHAT, body) == "Be brief.\nWhat is this?"


@pytest.mark.parametrize(
    ("prompt", "text"),
    [("Once upon", "Once upon"), (["one", "two"], "one\ntwo"), ([[1, 2, 3]], ""), (None, "")],
)
def test_a_completions_prompt_is_its_string_or_strings(prompt: object, text: str) -> None:
    assert prompt_text("completions", {"prompt": prompt}) == text


def test_a_responses_prompt_is_its_instructions_and_input() -> None:
    body = {
        "instructions": "Answer in French.",
        "input": [
            {"role": "user", "content": "Hello"},
            {"role": "user", "content": [{"type": "input_text", "text": "and rivers?"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ],
    }

    assert prompt_text(Api.RESPONSES, body) == "Answer in French.\nHello\nand rivers?\n42"
    assert prompt_text(Api.RESPONSES, {"input": "Just this"}) == "Just this"


def test_an_unknown_api_is_refused() -> None:
    with pytest.raises(ValueError, match="images"):
        prompt_text("images", {})


# Asking for usage on the client's behalf


def test_asking_for_usage_edits_a_stream_the_client_did_not_ask_for() -> None:
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_obfuscation": False}}

    assert ask_for_usage(body) is False
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}

    turned_off: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": False}}
    assert ask_for_usage(turned_off) is False
    assert turned_off["stream_options"] == {"include_usage": True}


def test_a_client_that_asked_for_usage_is_left_alone() -> None:
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}

    assert ask_for_usage(body) is True
    assert body == {"stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"stream": False},
        {"stream": True, "stream_options": "yes"},
        {"stream": True, "stream_options": {"include_usage": "yes"}},
    ],
)
def test_a_body_that_does_not_stream_or_is_malformed_is_not_edited(body: dict[str, Any]) -> None:
    before = json.loads(json.dumps(body))

    assert ask_for_usage(body) is False
    assert body == before


def test_only_a_chunk_without_choices_that_carries_usage_is_usage_only() -> None:
    assert is_usage_only_chunk({"choices": [], "usage": {"prompt_tokens": 1}})
    assert not is_usage_only_chunk(chat_chunk("a", {"prompt_tokens": 1}))
    assert not is_usage_only_chunk({"choices": [], "usage": None})
    assert not is_usage_only_chunk({"type": "response.completed", "response": {}})


def test_the_client_view_drops_a_null_usage_and_leaves_the_original_whole() -> None:
    chunk = chat_chunk("a")

    assert client_view(chunk) == {key: value for key, value in chunk.items() if key != "usage"}
    assert chunk["usage"] is None
    # A report the upstream chose to put on a content chunk is information: it stays.
    reporting = chat_chunk("a", {"prompt_tokens": 1, "completion_tokens": 1})
    assert client_view(reporting) == reporting
