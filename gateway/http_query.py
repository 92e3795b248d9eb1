"""Query parameters of the HTTP front door: a route takes only those it names.

A misspelt or unsupported parameter (`?min_ram=4000`) would otherwise be ignored and the
caller would get an unfiltered answer that looks like a filtered one; bodies refuse unknown
fields for the same reason. Every route is wrapped by `only`, so the rule holds everywhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

from starlette.requests import Request
from starlette.responses import Response

from schemas.errors import InvalidArgument

Endpoint = Callable[[Request], Awaitable[Response]]


def check(request: Request, allowed: Collection[str]) -> None:
    """Refuse a parameter the route does not take, or one given twice, naming it."""
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name not in allowed:
            takes = (
                f"this route takes {', '.join(sorted(allowed))}"
                if allowed
                else "this route takes no query parameters"
            )
            raise InvalidArgument(f"unknown query parameter; {takes}", field=name[:64])
        if name in seen:
            raise InvalidArgument("given more than once", field=name)
        seen.add(name)


def only(endpoint: Endpoint, allowed: Collection[str] = ()) -> Endpoint:
    """`endpoint`, refusing any query parameter outside `allowed` before it runs."""
    names = frozenset(allowed)

    async def checked(request: Request) -> Response:
        check(request, names)
        return await endpoint(request)

    checked.__name__ = endpoint.__name__
    return checked
