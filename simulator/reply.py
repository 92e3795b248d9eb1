"""The bodies of a generated answer: chat and text completions here, the Responses API in
`simulator.response`; both are a `Shape` the server fills the same way.

A streamed answer is, in order: its preamble (sent at once), its opening (with the first
token's time), one frame per token, and its closing (after the last token, with the usage).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Protocol

import msgspec


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    """Leading prompt tokens the KV cache held."""


class Shape(Protocol):
    """One answer's bodies, whole or as server-sent-event frames."""

    def whole(self, text: str, usage: Usage) -> dict[str, Any]: ...

    def preamble(self) -> list[bytes]: ...

    def opening(self) -> list[bytes]: ...

    def piece(self, token: str) -> bytes: ...

    def closing(self, text: str, usage: Usage) -> list[bytes]: ...


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """A chat or text completion: the parts every body of it shares, and the bodies."""

    kind: Literal["chat", "text"]
    model: str
    finish: str
    include_usage: bool = False
    report_cached: bool = False
    """Add `prompt_tokens_details.cached_tokens` to the usage, as vLLM does when its prefix
    cache reports (`--enable-prompt-tokens-details`); off, the usage is OpenAI's three counts."""
    id: str = msgspec.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = msgspec.field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            kind = "chat.completion.chunk" if chunk else "chat.completion"
            return {"id": f"chatcmpl-{self.id}", "object": kind}
        return {"id": f"cmpl-{self.id}", "object": "text_completion"}

    def usage(self, usage: Usage) -> dict[str, Any]:
        counts: dict[str, Any] = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }
        if self.report_cached:
            counts["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
        return counts

    def whole(self, text: str, usage: Usage) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=self.finish)
        return {
            **self._head(chunk=False),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(usage),
        }

    def preamble(self) -> list[bytes]:
        return []

    def opening(self) -> list[bytes]:
        if self.kind == "chat":
            return [sse(self._chunk({"role": "assistant", "content": ""}, None))]
        return []

    def piece(self, token: str) -> bytes:
        return sse(self._chunk(token, None))

    def closing(self, text: str, usage: Usage) -> list[bytes]:
        empty: dict[str, str] | str = {} if self.kind == "chat" else ""
        frames = [sse(self._chunk(empty, self.finish))]
        if self.include_usage:
            frames.append(sse(self._usage_chunk(usage)))
        frames.append(b"data: [DONE]\n\n")
        return frames

    def _chunk(self, piece: dict[str, str] | str, finish: str | None) -> dict[str, Any]:
        """One streamed chunk: `piece` is a chat delta (a string means its content) or a
        completion's text."""
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["delta"] = {"content": piece} if isinstance(piece, str) else piece
        else:
            choice["text"] = piece
        choice.update(logprobs=None, finish_reason=finish)
        chunk = {
            **self._head(chunk=True),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            # OpenAI marks every chunk but the last with "usage": null when usage is asked.
            chunk["usage"] = None
        return chunk

    def _usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {
            **self._head(chunk=True),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(usage),
        }
