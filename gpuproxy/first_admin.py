"""The first administrator of a fresh installation.

From GPUPROXY_ADMIN_EMAIL and GPUPROXY_ADMIN_PASSWORD when both are set; otherwise with a
generated password that is printed once, on the run that creates the account, and never
again (only its Argon2 hash is kept).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping

from sqlalchemy.ext.asyncio import create_async_engine

from gateway.accounts.store import Accounts
from schemas.errors import ConfigError, InvalidArgument

DEFAULT_EMAIL = "admin@gpuproxy.local"


async def _ensure(database_url: str, email: str, password: str) -> bool:
    engine = create_async_engine(database_url, hide_parameters=True)
    try:
        accounts = Accounts(engine)
        if await accounts.has_admin():
            return False
        # The operator's own account: no rate limit (it can grant limits to others, not itself).
        await accounts.register(email, password, role="admin", rate_limit_per_minute=0)
        return True
    finally:
        await engine.dispose()


def ensure(database_url: str, env: Mapping[str, str]) -> tuple[str, str] | None:
    """Create the first admin if there is none; returns (email, generated password) when the
    password was generated here and must be shown to the operator."""
    email = env.get("GPUPROXY_ADMIN_EMAIL", "").strip()
    password = env.get("GPUPROXY_ADMIN_PASSWORD", "")
    generated = not password
    if generated:
        password = secrets.token_urlsafe(18)
    try:
        created = asyncio.run(_ensure(database_url, email or DEFAULT_EMAIL, password))
    except InvalidArgument as exc:
        name = "GPUPROXY_ADMIN_EMAIL" if exc.field == "email" else "GPUPROXY_ADMIN_PASSWORD"
        raise ConfigError(exc.message, field=name) from None
    if created and generated:
        return email or DEFAULT_EMAIL, password
    return None
