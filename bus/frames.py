"""Streamed pieces of an answer on the wire, without JSON around them.

Every other chunk is JSON (`schemas.replies`), but a `Data` chunk carries bytes (server-sent
events of inference tokens), and bytes inside JSON would travel base64-encoded, a third
larger and encoded twice. A data frame is a short binary head and the body as it is. JSON
always starts with `{`, so one byte tells the two apart.
"""

from __future__ import annotations

import struct

from schemas.replies import Data

_MARK = 1
_HEAD = struct.Struct("<BIIH")
"""Mark, attempt, seq, length of the command id; then the command id, then the body."""


def data_frame(command_id: str, attempt: int, seq: int, body: bytes) -> bytes:
    cid = command_id.encode()
    return _HEAD.pack(_MARK, attempt, seq, len(cid)) + cid + body


def is_data_frame(raw: bytes) -> bool:
    return len(raw) >= _HEAD.size and raw[0] == _MARK


def read_data_frame(raw: bytes) -> Data:
    _, attempt, seq, size = _HEAD.unpack_from(raw)
    start = _HEAD.size
    command_id = raw[start : start + size].decode()
    return Data(command_id=command_id, attempt=attempt, seq=seq, body=raw[start + size :])
