"""gRPC method handlers rebuilt around a wrapper: what the gateway's server interceptors
share. Unary and streaming methods alike come through here, so a wrapper covers them all."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
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


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps each method's handler once and keeps the result:
    grpc asks for a handler on every call, and rebuilding it each time costs the hot path."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Handler] = {}

    @abc.abstractmethod
    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler to run for `method` instead of `handler`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: grpc answers UNIMPLEMENTED itself
        wrapped = self._wrapped[method] = self.wrap(method, handler)
        return wrapped
