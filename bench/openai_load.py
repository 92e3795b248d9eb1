"""The inference scenarios' load generator: OpenAI chat completions over one aiohttp pool.

Every inference scenario sends its requests through this one client, whether to a machine
directly or through the gateway, so a difference between two scenarios is the path's, not
the client's. aiohttp because it measured several times cheaper per request than httpx on
this two-core machine (`bench.upstream_client`): a load generator that eats the CPU it
shares with the servers would flatten every difference.

A streamed answer is read as it arrives, event by event; its time to first token is when the
first chunk with content came (the role-only opening chunk does not count). Every answer is
checked: the `sim` machine's tokens follow from the prompt, so the text to expect is known.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import msgspec

from bench.measure import Call, expect
from simulator import tokens
from simulator.upstream import DEFAULT_MODEL

MAX_TOKENS = 16
POOL_SIZE = 64
"""Connections kept open: more than the highest concurrency, so none is opened while measured."""
_DONE = b"[DONE]"


class BadAnswer(RuntimeError):
    """The path answered with an error status or a body that is not a chat completion."""


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    delta: _Message | None = None


class _Completion(msgspec.Struct):
    """What the load generator reads of a chat completion or of one streamed chunk."""

    choices: list[_Choice] = []


_decode = msgspec.json.Decoder(_Completion).decode


@dataclass(frozen=True)
class Answer:
    text: str
    ttft: float | None
    """Seconds from sending to the first content chunk; None for a whole answer."""
    seconds: float
    """From sending to the end of the answer."""


@dataclass(frozen=True)
class ChatClient:
    """Chat completions to one OpenAI-compatible base URL (`.../v1`), over one pool."""

    http: aiohttp.ClientSession
    base_url: str
    api_key: str = ""

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        stream: bool,
        max_tokens: int = MAX_TOKENS,
        on_first_token: Callable[[], None] | None = None,
    ) -> Answer:
        """One completion, read to its end; `on_first_token` is called as a streamed
        answer's first content chunk arrives, while the rest is still to come."""
        body = msgspec.json.encode(
            {
                "model": DEFAULT_MODEL,
                "messages": messages,
                "max_tokens": max_tokens,
                "stream": stream,
            }
        )
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        clock = time.perf_counter
        start = clock()
        async with self.http.post(
            f"{self.base_url}/chat/completions", data=body, headers=headers
        ) as response:
            if response.status != 200:
                raise BadAnswer(f"HTTP {response.status}: {(await response.read())[:300]!r}")
            if not stream:
                text = _text_of(_decoded(await response.read()), streamed=False)
                return Answer(text, None, clock() - start)
            pieces: list[str] = []
            ttft: float | None = None
            # aiohttp splits the body at newlines: one server-sent-event field per line.
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].rstrip()
                if data == _DONE:
                    break
                piece = _text_of(_decoded(data), streamed=True)
                if piece and ttft is None:
                    ttft = clock() - start
                    if on_first_token is not None:
                        on_first_token()
                pieces.append(piece)
            return Answer("".join(pieces), ttft, clock() - start)


def _decoded(data: bytes) -> _Completion:
    try:
        return _decode(data)
    except msgspec.DecodeError as exc:
        raise BadAnswer(f"not a chat completion: {data[:300]!r}") from exc


def _text_of(completion: _Completion, *, streamed: bool) -> str:
    if not completion.choices:
        return ""  # a usage chunk
    choice = completion.choices[0]
    part = choice.delta if streamed else choice.message
    return "" if part is None or part.content is None else part.content


@contextlib.asynccontextmanager
async def http_pool(timeout: float, size: int = POOL_SIZE) -> AsyncIterator[aiohttp.ClientSession]:
    """The one pool of keep-alive connections a scenario sends everything over, at most
    `size` of them; `timeout` bounds one request, first byte to last."""
    connector = aiohttp.TCPConnector(limit=size, use_dns_cache=False)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as http:
        yield http


def expected_answer(messages: list[dict[str, str]], max_tokens: int = MAX_TOKENS) -> str:
    """What a `sim` machine answers: its tokens follow from the prompt, the messages' text
    joined with newlines (`simulator.job`)."""
    prompt = "\n".join(m["content"] for m in messages)
    return "".join(tokens.generate(DEFAULT_MODEL, prompt, max_tokens))


def chat_call(client: ChatClient, *, stream: bool, ttfts: list[float] | None = None) -> Call:
    """A `Session` call: one chat completion with a prompt made from `n`, its answer checked;
    a streamed one adds its time to first token to `ttfts`."""

    async def call(n: int) -> None:
        messages = [{"role": "user", "content": f"bench request {n}: say something about GPUs"}]
        answer = await client.chat(messages, stream=stream)
        expect(expected_answer(messages), answer.text, "answer")
        if stream:
            if answer.ttft is None:
                raise BadAnswer("a streamed answer came without a content chunk")
            if ttfts is not None:
                ttfts.append(answer.ttft)

    return call
