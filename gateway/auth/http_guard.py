"""The HTTP side of the one authentication path: every route is made through `HttpGuard`.

`Authorization: Bearer <JWT or API key>` (what OpenAI SDKs send) or `X-API-Key`. A route
made any other way has no requirement attached, and the route census test fails on it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth import principal
from gateway.auth.gatekeeper import Gatekeeper, Presented
from gateway.auth.policy import Requirement

Endpoint = Callable[[Request], Awaitable[Response]]
REQUIREMENT = "gpuproxy_requirement"


def presented_by(request: Request) -> Presented:
    headers = request.headers
    return Presented(
        authorization=headers.get("authorization"),
        api_key=headers.get("x-api-key"),
        peer_host=request.client.host if request.client else "",
        forwarded_for=headers.get("x-forwarded-for"),
    )


class HttpGuard:
    def __init__(self, gatekeeper: Gatekeeper) -> None:
        self.gatekeeper = gatekeeper

    def route(
        self, path: str, endpoint: Endpoint, *, methods: Sequence[str], requirement: Requirement
    ) -> Route:
        gatekeeper = self.gatekeeper

        async def guarded(request: Request) -> Response:
            admission = await gatekeeper.admit(
                presented_by(request), requirement, f"{request.method} {path}"
            )
            bound = principal.bind(admission.principal)
            try:
                response = await endpoint(request)
            finally:
                principal.unbind(bound)
            response.headers.update(admission.headers())
            return response

        guarded.__name__ = endpoint.__name__
        setattr(guarded, REQUIREMENT, requirement)
        return Route(path, guarded, methods=list(methods))
