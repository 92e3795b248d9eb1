"""The Responses API's bodies (`POST /v1/responses`), whole or streamed, as OpenAI sends them.

The server keeps nothing, so a response has one output item: the assistant's message with
one `output_text` part. An answer cut by `max_output_tokens` is `incomplete`, with
`incomplete_details.reason` saying so, and its stream ends with `response.incomplete`
instead of `response.completed`, as at OpenAI. Every streamed event is an `event:` line and
a `data:` line, carries a `sequence_number`, and no `[DONE]` follows the last one.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from simulator.reply import Usage


class ResponseReply:
    """One response: its ids, its settings echoed back, and the count of events sent."""

    def __init__(
        self, *, model: str, finish: str, max_output_tokens: int, instructions: str | None
    ) -> None:
        self.model = model
        self.incomplete = finish == "length"
        self.max_output_tokens = max_output_tokens
        self.instructions = instructions
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self._sequence = 0

    def _body(
        self, status: str, output: list[dict[str, Any]], usage: Usage | None
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "store": False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": None if usage is None else _usage(usage),
            "metadata": {},
        }

    @property
    def _status(self) -> str:
        return "incomplete" if self.incomplete else "completed"

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(payload) + b"\n\n"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def whole(self, text: str, usage: Usage) -> dict[str, Any]:
        message = self._message(self._status, [self._part(text)])
        return self._body(self._status, [message], usage)

    def preamble(self) -> list[bytes]:
        started = self._body("in_progress", [], None)
        return [
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
        ]

    def opening(self) -> list[bytes]:
        return [
            self._event(
                "response.output_item.added",
                output_index=0,
                item=self._message("in_progress", []),
            ),
            self._event("response.content_part.added", **self._where(), part=self._part("")),
        ]

    def piece(self, token: str) -> bytes:
        return self._event("response.output_text.delta", **self._where(), delta=token, logprobs=[])

    def closing(self, text: str, usage: Usage) -> list[bytes]:
        part = self._part(text)
        ending = "response.incomplete" if self.incomplete else "response.completed"
        return [
            self._event("response.output_text.done", **self._where(), text=text, logprobs=[]),
            self._event("response.content_part.done", **self._where(), part=part),
            self._event(
                "response.output_item.done",
                output_index=0,
                item=self._message(self._status, [part]),
            ),
            self._event(ending, response=self.whole(text, usage)),
        ]


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
