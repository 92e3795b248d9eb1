"""JSON on the wire, through msgspec: one encoder, one decoder per type, made once."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


class Decoder(Generic[T]):
    """A typed JSON decoder; `DecodeError` names the path of the bad field."""

    def __init__(self, type_: type[T] | Any) -> None:
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type_)

    def decode(self, data: bytes) -> T:
        return self._decoder.decode(data)
