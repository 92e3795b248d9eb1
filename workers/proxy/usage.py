"""How many tokens a request used, read from what the upstream sent its caller.

Every inference request ends in exactly one usage record, also when it is cancelled or fails
midway, and it counts what was produced and delivered. The proxy feeds a `UsageMeter` with
each server-sent event's JSON as it passes it on (`feed_event`), or with a whole answer's
JSON (`feed_body`), and asks it for the `Usage` at the end, however the request ended.

The three dialects of the OpenAI API are read by their shape, so the meter needs no API name:

- chat completions: `choices[].delta` chunks (a whole answer: `choices[].message`), usage as
  `prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`;
- completions: `choices[].text`, the same usage keys;
- responses: `response.*.delta` events (a whole answer: `output[]` items), usage in
  `response.completed` (or `response.incomplete` / `response.failed`) as `input_tokens`,
  `output_tokens`, `input_tokens_details.cached_tokens`;
- embeddings, whole only: `usage.prompt_tokens`, no output.

**Reported wins.** When the upstream reports usage, that is the usage; the last report wins,
since servers that report on every chunk (vLLM's `continuous_usage_stats`) send running
totals. Chat and completions streams report only when asked: `ask_for_usage` asks on the
client's behalf, and `is_usage_only_chunk` / `client_view` keep the answer the client sees
as it would have been had the proxy not asked.

**Otherwise counted.** With no report (a cut stream, a server that never reports) the meter
counts, and marks the usage `estimated`: output is what the pieces of text delivered add up
to, input is the prompt's text (`prompt_text`) given at the start. `estimate_tokens` is the
one rule for both: a piece of text counts one token per started 4 characters, so every
non-empty piece counts at least one (a streamed piece is usually one token, often shorter
than 4 characters). Only what reached the meter counts: a stream cut after three pieces
counts three pieces. An error from the upstream before any text counts nothing (a refusal
ran no model); text delivered before an error counts, with the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from schemas.inference import Api, Usage

CHARACTERS_PER_TOKEN = 4
"""The common rule of thumb for English text and BPE tokenizers."""

RESPONSE_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    }
)
"""Responses API events whose `delta` is generated text the caller receives."""


def estimate_tokens(text: str) -> int:
    """Tokens in `text` by the rule of thumb: one per started 4 characters."""
    return -(-len(text) // CHARACTERS_PER_TOKEN)


class UsageMeter:
    """The usage of one request, from what the upstream delivered to its caller."""

    def __init__(self, prompt_text: str = "") -> None:
        """`prompt_text` is the request's prompt (`prompt_text()`), counted only when the
        upstream reports no usage."""
        self._prompt_tokens = estimate_tokens(prompt_text)
        self._output_tokens = 0
        self._reported: Usage | None = None
        self._failed = False

    def feed_event(self, payload: object) -> None:
        """One server-sent event's decoded JSON, in the order the caller receives them."""
        if not isinstance(payload, dict):
            return
        self._failed = self._failed or _is_error(payload)
        self._output_tokens += sum(map(estimate_tokens, _event_texts(payload)))
        self._take_report(payload.get("usage"))
        response = payload.get("response")
        if isinstance(response, dict):
            self._take_report(response.get("usage"))

    def feed_body(self, body: object) -> None:
        """A whole answer's decoded JSON."""
        if not isinstance(body, dict):
            return
        self._failed = self._failed or _is_error(body)
        self._output_tokens += sum(map(estimate_tokens, _body_texts(body)))
        self._take_report(body.get("usage"))

    def usage(self) -> Usage:
        """The usage so far: reported when the upstream reported it, counted otherwise."""
        if self._reported is not None:
            return self._reported
        if self._failed and not self._output_tokens:
            # An error before any text: the upstream refused or failed; nothing to bill.
            return Usage(estimated=True)
        return Usage(
            input_tokens=self._prompt_tokens,
            output_tokens=self._output_tokens,
            estimated=True,
        )

    def _take_report(self, usage: object) -> None:
        reported = _reported_usage(usage)
        if reported is not None:
            self._reported = reported


def ask_for_usage(body: dict[str, Any]) -> bool:
    """Make a streamed chat or completions request ask for a final usage chunk; whether the
    client asked for it itself (then the client sees usage as it asked).

    Only for those two APIs: a responses stream always ends with its usage, and embeddings do
    not stream. A body that does not stream is left alone (upstreams refuse `stream_options`
    without `stream`), as is a malformed `stream_options`, for the upstream to refuse as it
    would have.
    """
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return False
    asked = options.get("include_usage")
    if asked is True:
        return True
    if asked not in (None, False) or body.get("stream") is not True:
        return False
    body["stream_options"] = {**options, "include_usage": True}
    return False


def is_usage_only_chunk(payload: object) -> bool:
    """Whether `payload` is the chunk that carries a stream's usage and nothing else: the one
    to hold back from a client that did not ask for usage."""
    return (
        isinstance(payload, dict)
        and payload.get("choices") == []
        and isinstance(payload.get("usage"), dict)
    )


def client_view(payload: dict[str, Any]) -> dict[str, Any]:
    """A chunk as a client that did not ask for usage would have received it: without the
    `"usage": null` that upstreams put on every chunk once usage is asked for. `payload`
    itself is left as it was, for the meter."""
    if "usage" in payload and payload["usage"] is None:
        return {key: value for key, value in payload.items() if key != "usage"}
    return payload


def prompt_text(api: str, body: dict[str, Any]) -> str:
    """The text of a request's prompt, for estimating its input tokens: what the model reads,
    as far as text goes (images, audio and token-id prompts add nothing)."""
    match Api(api):
        case Api.CHAT:
            return _joined(_message_texts(body.get("messages")))
        case Api.COMPLETIONS:
            return _joined(_strings(body.get("prompt")))
        case Api.RESPONSES:
            return _joined([*_strings(body.get("instructions")), *_input_texts(body.get("input"))])
        case Api.EMBEDDINGS:
            return _joined(_strings(body.get("input")))


def _joined(texts: Iterable[str]) -> str:
    return "\n".join(text for text in texts if text)


def _is_error(payload: dict[str, Any]) -> bool:
    """An error answer or event, in OpenAI's shape (`error` object), vLLM's older one
    (`"object": "error"`) or the responses stream's (`"type": "error"`). A responses object
    carries `"error": null` when all went well."""
    return (
        isinstance(payload.get("error"), dict)
        or payload.get("object") == "error"
        or payload.get("type") == "error"
    )


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _reported_usage(usage: object) -> Usage | None:
    """A usage report in either naming (responses: `input_tokens`; chat, completions and
    embeddings: `prompt_tokens`); None when there is none or it makes no sense."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage:
        names = ("input_tokens", "output_tokens", "input_tokens_details")
    else:
        names = ("prompt_tokens", "completion_tokens", "prompt_tokens_details")
    input_tokens = _count(usage.get(names[0]))
    # Embeddings report no output tokens at all: absent is zero, anything else must count.
    output_tokens = _count(usage.get(names[1], 0))
    if input_tokens is None or output_tokens is None:
        return None
    details = usage.get(names[2])
    # vLLM sends `"prompt_tokens_details": null` and some servers a null count.
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(
        input_tokens=input_tokens,
        cached_tokens=min(cached or 0, input_tokens),
        output_tokens=output_tokens,
        estimated=False,
    )


def _event_texts(payload: dict[str, Any]) -> Iterator[str]:
    """The generated text one streamed event delivers."""
    kind = payload.get("type")
    if isinstance(kind, str) and kind.startswith("response."):
        delta = payload.get("delta")
        if kind in RESPONSE_TEXT_DELTAS and isinstance(delta, str):
            yield delta
        return
    yield from _choice_texts(payload.get("choices"), "delta")


def _body_texts(body: dict[str, Any]) -> Iterator[str]:
    """The generated text of a whole answer."""
    yield from _choice_texts(body.get("choices"), "message")
    output = body.get("output")
    if isinstance(output, list):
        for item in output:
            if isinstance(item, dict):
                yield from _output_item_texts(item)


def _choice_texts(choices: object, message_key: str) -> Iterator[str]:
    """Text of chat choices (`delta` or `message`) and of completions choices (`text`)."""
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")
        if isinstance(text, str):
            yield text
        message = choice.get(message_key)
        if isinstance(message, dict):
            yield from _message_output_texts(message)


def _message_output_texts(message: dict[str, Any]) -> Iterator[str]:
    """What a model generated in a chat message or delta: content, refusal, reasoning (vLLM
    and others stream it beside the content) and tool call arguments."""
    for key in ("content", "refusal", "reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str):
            yield value
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                yield arguments


def _output_item_texts(item: dict[str, Any]) -> Iterator[str]:
    """Generated text of one responses `output` item: message parts, function call
    arguments, reasoning text and summaries."""
    arguments = item.get("arguments")
    if isinstance(arguments, str):
        yield arguments
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list):
            for part in parts:
                if isinstance(part, dict):
                    yield from _strings([part.get("text"), part.get("refusal")])


def _strings(value: object) -> list[str]:
    """A string, or the strings of a list (a batch of prompts or inputs)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def _content_texts(content: object) -> list[str]:
    """A message's content: a string, or the text of its parts."""
    if isinstance(content, list):
        return [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
    return _strings(content)


def _message_texts(messages: object) -> Iterator[str]:
    if not isinstance(messages, list):
        return
    for message in messages:
        if isinstance(message, dict):
            yield from _content_texts(message.get("content"))


def _input_texts(items: object) -> Iterator[str]:
    """A responses `input`: a string, or items: messages, and the outputs and arguments of
    earlier tool calls the model reads again."""
    if isinstance(items, str):
        yield items
        return
    if not isinstance(items, list):
        return
    for item in items:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            yield from _content_texts(item.get("content"))
            yield from _strings(item.get("output"))
            yield from _strings(item.get("arguments"))
