"""What the gateway checks of an inference request before anything is published.

Only what must be right for the request to be routed and held to its limits: the body is a
JSON object, `model` names one, `stream` and the output-token limits have the right types
and ranges, and a responses request does not ask to be stored. Everything else is the
upstream's to judge, and it answers in OpenAI's own terms.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.errors import InvalidArgument
from schemas.inference import Api

MAX_OUTPUT_TOKENS = 1_048_576
MAX_MODEL_LENGTH = 256
_LIMITS = {
    Api.CHAT: ("max_tokens", "max_completion_tokens"),
    Api.COMPLETIONS: ("max_tokens",),
    Api.RESPONSES: ("max_output_tokens",),
    Api.EMBEDDINGS: (),
}


class Checked(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    stream: bool
    session_key: str
    body: bytes
    """The body to send: as received, or with the model the target named filled in."""


def check(api: Api, raw: bytes, *, target_model: str | None = None) -> Checked:
    """`target_model`: the request named its model elsewhere (gRPC's `target_url`); "" when
    it named a machine instead, and the body may then leave the model out."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise InvalidArgument(
            "the body is not valid JSON; send a JSON object", field="body"
        ) from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object", field="body")
    model = body.get("model")
    if target_model and model is None:
        body["model"] = model = target_model
        raw = msgspec.json.encode(body)
    elif target_model and model != target_model:
        raise InvalidArgument(
            f"names another model than target_url ({target_model})", field="model"
        )
    if target_model == "" and model is None:
        model = ""
    elif not isinstance(model, str) or not model.strip():
        raise InvalidArgument("name the model to use, as a string", field="model")
    if len(model) > MAX_MODEL_LENGTH:
        raise InvalidArgument(f"at most {MAX_MODEL_LENGTH} characters", field="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidArgument("must be true or false", field="stream")
    if stream and not api.streams:
        raise InvalidArgument("embeddings are not streamed", field="stream")
    for name in _LIMITS[api]:
        _check_limit(body, name)
    if api is Api.RESPONSES and body.get("store") not in (None, False):
        raise InvalidArgument(
            "responses are not stored here: send `store: false` (or leave it out) and pass "
            "the conversation in `input`",
            field="store",
        )
    user = body.get("user")
    session_key = user if isinstance(user, str) else ""
    return Checked(model=model, stream=stream, session_key=session_key, body=raw)


def _check_limit(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("must be a whole number", field=name)
    if not 1 <= value <= MAX_OUTPUT_TOKENS:
        raise InvalidArgument(f"must be between 1 and {MAX_OUTPUT_TOKENS}", field=name)
