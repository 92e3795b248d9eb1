"""Inference requests as the simulated server reads them: checked, or refused with a 400
naming the field, as OpenAI answers.

A prompt is the text of what the request sends, joined with newlines: a chat's messages in
order, a completion's prompt, a response's instructions then its input items. Images and
audio add nothing to a simulated answer, so only text parts count.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from simulator.errors import ApiError, missing

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_CAP = 1_048_576
"""Larger `max_tokens` is refused (400), as a real server refuses more than its context."""

DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 64

Kind = Literal["chat", "text", "response"]
"""Chat completions, (text) completions, and the Responses API."""


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One generation request, checked."""

    kind: Kind
    prompt: str
    max_tokens: int
    seed: int | None
    stream: bool
    include_usage: bool = False
    instructions: str | None = None
    """A response's instructions, echoed in its body."""
    ignore_eos: bool = False
    """vLLM's extra parameter: generate exactly `max_tokens`, never stopping by itself."""


class EmbeddingJob(msgspec.Struct, frozen=True, kw_only=True):
    """One embeddings request, checked."""

    texts: list[str]
    base64: bool
    """`encoding_format` "base64": little-endian float32 bytes, base64-encoded."""
    dimensions: int


def int_field(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"Invalid type for '{name}': expected an integer.", param=name)
    return value


def _bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name) or False
    if not isinstance(value, bool):
        raise ApiError(400, f"Invalid type for '{name}': expected a boolean.", param=name)
    return value


def _text_of(content: Any, where: str) -> str:
    """The text of a message's content: a string, or a list of parts of which the `text`
    ones count."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise ApiError(400, f"Invalid type for '{where}': expected a string or an array.", param=where)


def _messages_text(messages: list[Any], field: str) -> list[str]:
    texts = []
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"Invalid '{where}': expected an object with a role.", param=where)
        if message.get("type", "message") != "message":
            raise ApiError(
                400, f"Invalid '{where}': this server reads message items only.", param=where
            )
        texts.append(_text_of(message.get("content"), f"{where}.content"))
    return texts


def _prompt_of(kind: Kind, body: dict[str, Any]) -> str:
    field = {"chat": "messages", "text": "prompt", "response": "input"}[kind]
    if body.get(field) is None:
        raise missing(field)
    value = body[field]
    if kind == "text":
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ApiError(
                400, "Invalid 'prompt': expected a string (one prompt per request).", param=field
            )
        return value
    if kind == "response":
        instructions = body.get("instructions")
        head = [instructions] if instructions else []
        if isinstance(value, str):
            return "\n".join([*head, value])
        if not isinstance(value, list) or not value:
            raise ApiError(
                400, "Invalid 'input': expected a string or a non-empty array.", param=field
            )
        return "\n".join([*head, *_messages_text(value, field)])
    if not isinstance(value, list) or not value:
        raise ApiError(400, "Invalid 'messages': expected a non-empty array.", param=field)
    return "\n".join(_messages_text(value, field))


def _limit_of(kind: Kind, body: dict[str, Any]) -> int:
    """The answer's token limit."""
    if kind == "response":
        limit = "max_output_tokens"
    # Chat's newer name wins over the older one, as at OpenAI.
    elif kind == "chat" and body.get("max_completion_tokens") is not None:
        limit = "max_completion_tokens"
    else:
        limit = "max_tokens"
    max_tokens = int_field(body, limit, DEFAULT_MAX_TOKENS)
    assert max_tokens is not None
    if not 1 <= max_tokens <= MAX_TOKENS_CAP:
        raise ApiError(
            400,
            f"Invalid '{limit}': {max_tokens}; this model answers 1 to {MAX_TOKENS_CAP} tokens.",
            param=limit,
        )
    return max_tokens


def _check_response_fields(body: dict[str, Any]) -> None:
    """What a stateless Responses server cannot do, refused rather than ignored."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(
            400, "Invalid type for 'instructions': expected a string.", param="instructions"
        )
    if body.get("store") not in (None, False):
        raise ApiError(
            400,
            "Invalid 'store': this server keeps no responses; send 'store': false.",
            param="store",
        )
    if body.get("previous_response_id") is not None:
        raise ApiError(
            400,
            "Invalid 'previous_response_id': this server keeps no responses to continue.",
            param="previous_response_id",
        )


def job_of(kind: Kind, body: dict[str, Any]) -> Job:
    if kind == "response":
        _check_response_fields(body)
    prompt = _prompt_of(kind, body)
    max_tokens = _limit_of(kind, body)
    stream = _bool_field(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise ApiError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError(
            400, "Invalid type for 'stream_options': expected an object.", param="stream_options"
        )
    return Job(
        kind=kind,
        prompt=prompt,
        max_tokens=max_tokens,
        seed=int_field(body, "seed", None),
        stream=stream,
        include_usage=kind != "response" and bool((stream_options or {}).get("include_usage")),
        instructions=body.get("instructions") if kind == "response" else None,
        ignore_eos=body.get("ignore_eos") is True,
    )


def embedding_job_of(body: dict[str, Any]) -> EmbeddingJob:
    if body.get("input") is None:
        raise missing("input")
    value = body["input"]
    texts = [value] if isinstance(value, str) else value
    if (
        not isinstance(texts, list)
        or not texts
        or not all(isinstance(text, str) and text for text in texts)
    ):
        # Token arrays are what OpenAI also accepts; a simulator has no tokenizer to read them.
        raise ApiError(
            400,
            "Invalid 'input': expected a non-empty string or a non-empty array of them"
            " (token arrays are not supported).",
            param="input",
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(
            400,
            f"Invalid 'encoding_format': {encoding!r}; one of 'float', 'base64'.",
            param="encoding_format",
        )
    dimensions = int_field(body, "dimensions", DEFAULT_DIMENSIONS)
    assert dimensions is not None
    if not 1 <= dimensions <= MAX_DIMENSIONS:
        raise ApiError(
            400,
            f"Invalid 'dimensions': {dimensions}; this model gives 1 to {MAX_DIMENSIONS}.",
            param="dimensions",
        )
    return EmbeddingJob(texts=texts, base64=encoding == "base64", dimensions=dimensions)
