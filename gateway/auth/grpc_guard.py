"""The gRPC side of the one authentication path: a server interceptor that wraps every
method handler (unary and streaming alike) in the same `Gatekeeper.admit` as HTTP.

Credentials come from `authorization: Bearer <JWT or API key>` or `x-api-key` metadata (or
a request field the policy names). A method without a policy entry is refused outright.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from gateway.auth import principal
from gateway.auth.addresses import grpc_peer_host
from gateway.auth.gatekeeper import Gatekeeper, Presented
from gateway.auth.policy import Requirement
from gateway.auth.principal import Principal
from gateway.errors import grpc_status
from gateway.grpc_handlers import WrappingInterceptor, rebuilt
from schemas.errors import GpuproxyError, PermissionDenied

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]


def _presented(context: Context, request: Any, requirement: Requirement) -> Presented:
    authorization = api_key = forwarded = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            authorization = str(value)
        elif key == "x-api-key":
            api_key = str(value)
        elif key == "x-forwarded-for":
            forwarded = str(value)
    token_field = None
    if requirement.token_field and request is not None:
        token_field = str(getattr(request, requirement.token_field, "") or "") or None
    return Presented(
        authorization=authorization,
        api_key=api_key,
        peer_host=grpc_peer_host(context.peer()),
        forwarded_for=forwarded,
        token_field=token_field,
    )


class _Door:
    """Admits one call of one method, or aborts it with the matching status."""

    def __init__(self, gatekeeper: Gatekeeper, requirement: Requirement, method: str) -> None:
        self._gatekeeper = gatekeeper
        self._requirement = requirement
        self._method = method

    async def admit(self, context: Context, request: Any = None) -> Principal | None:
        """The admitted caller, or the call aborted with the refusal's status."""
        try:
            admission = await self._gatekeeper.admit(
                _presented(context, request, self._requirement), self._requirement, self._method
            )
        except GpuproxyError as exc:
            code, message = grpc_status(exc)
            trailing = tuple((k.lower(), v) for k, v in exc.headers().items())
            await context.abort(code, message, trailing_metadata=trailing)
        if admission.quota is not None:
            context.set_trailing_metadata(
                tuple((k.lower(), v) for k, v in admission.headers().items())
            )
        return admission.principal


# The wrappers spell out bind/unbind rather than share a context manager: this runs on every
# call, and an async context manager costs more than the rest of the wrapper.


def _wrap(door: _Door, behaviour: Callable[..., Any], client_streams: bool) -> Callable[..., Any]:
    # A handler is either an async generator (yields replies) or a coroutine (returns the
    # reply, or writes through `context`); the wrapper must be the same kind. A client
    # stream's messages are not read here: credentials come from metadata alone.
    if inspect.isasyncgenfunction(behaviour):

        async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
            bound = principal.bind(await door.admit(context, None if client_streams else request))
            try:
                async for reply in behaviour(request, context):
                    yield reply
            finally:
                principal.unbind(bound)

        return generator

    async def coroutine(request: Any, context: Context) -> Any:
        bound = principal.bind(await door.admit(context, None if client_streams else request))
        try:
            return await behaviour(request, context)
        finally:
            principal.unbind(bound)

    return coroutine


def _refusal(method: str) -> Callable[..., Any]:
    async def refuse(request: Any, context: Context) -> None:
        code, message = grpc_status(PermissionDenied(f"no access rule covers {method}"))
        await context.abort(code, message)

    return refuse


class GuardInterceptor(WrappingInterceptor):
    def __init__(self, gatekeeper: Gatekeeper, policy: Mapping[str, Requirement]) -> None:
        super().__init__()
        self._gatekeeper = gatekeeper
        self._policy = policy

    def wrap(self, method: str, handler: Handler) -> Handler:
        requirement = self._policy.get(method)
        if requirement is None:
            refuse = _refusal(method)
            return rebuilt(handler, lambda behaviour, client_streams: refuse)
        if requirement.public and not requirement.per_address:
            return handler
        door = _Door(self._gatekeeper, requirement, method)
        return rebuilt(
            handler, lambda behaviour, client_streams: _wrap(door, behaviour, client_streams)
        )
