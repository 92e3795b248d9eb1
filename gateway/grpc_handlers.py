"""gRPC method handlers rebuilt around a wrapper: what the gateway's server interceptors
share. Unary and streaming methods alike come through here, so a wrapper covers them all."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]

Wrap = Callable[[Callable[..., Any], bool], Callable[..., Any]]
"""(behaviour, whether the client streams) -> the behaviour to run instead."""


def rebuilt(handler: Handler, wrap: Wrap) -> Handler:
    """The same method handler with its behaviour wrapped; `wrap` learns whether the
    client streams (then the request argument is an iterator, not a message)."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, False), **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, True), **codec)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), **codec)
