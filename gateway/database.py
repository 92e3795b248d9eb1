"""The gateway's handle on SQL: for now, whether the database answers."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def engine_for(url: str) -> AsyncEngine:
    # An SQL error's text carries its bound values (a password hash, a token digest) unless
    # told not to, and that text reaches tracebacks and logs.
    return create_async_engine(url, pool_pre_ping=True, hide_parameters=True)


async def reachable(engine: AsyncEngine) -> None:
    """Raises when a trivial query cannot run."""
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
