"""Inference on the bus: what a gateway asks the proxy worker, and what comes back.

A request travels as one `Inference` command. The client's JSON body rides inside it as
`msgspec.Raw`: embedded as it is, neither parsed again nor inflated by base64. A streamed
answer comes back as `Data` chunks that carry the server-sent events to write to the client,
then one `InferenceDone`; a whole answer is the `InferenceDone` alone, its body raw JSON too.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

MODEL_NAME = Annotated[str, msgspec.Meta(max_length=256)]


class Api(enum.StrEnum):
    """The OpenAI-compatible endpoint a request is for."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"

    @property
    def path(self) -> str:
        """The upstream path that serves it."""
        return _PATHS[self]

    @property
    def streams(self) -> bool:
        """Whether the endpoint may answer as a stream of events."""
        return self is not Api.EMBEDDINGS


_PATHS = {
    Api.CHAT: "/v1/chat/completions",
    Api.COMPLETIONS: "/v1/completions",
    Api.EMBEDDINGS: "/v1/embeddings",
    Api.RESPONSES: "/v1/responses",
}


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens of one request: what the upstream reported, or counted when it reported none."""

    input_tokens: int = 0
    cached_tokens: int = 0
    """Part of `input_tokens` that the machine had cached (billed at the cached price)."""
    output_tokens: int = 0
    estimated: bool = False
    """Counted by the proxy because the upstream reported no usage (or was cut short)."""


class InferenceDone(msgspec.Struct, frozen=True, kw_only=True, tag="inference_done"):
    """The end of an inference request, streamed or whole."""

    status: int = 200
    """The upstream's HTTP status, passed on to the client."""
    body: msgspec.Raw = msgspec.Raw(b"null")
    """A whole answer's JSON; `null` for a stream (its events came as `Data`)."""
    model: str
    instance_id: str
    usage: Usage
    cost_micros: int
    """What the request costs at the price in force, in micro-units."""


class ServedModel(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created: int = 0
    owned_by: str = "gpuproxy"
    instances: int = 0
    """How many machines serve it for this caller now."""


class ModelList(msgspec.Struct, frozen=True, kw_only=True, tag="models"):
    models: list[ServedModel]
