"""Passwords: Argon2id (memory-hard), hashed and checked off the event loop.

Checking an unknown user's password still costs one Argon2 verification, so the answer
time does not tell which email addresses have accounts.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from schemas.errors import InvalidArgument

MIN_LENGTH = 10
MAX_LENGTH = 1024
"""Long enough for any passphrase, short enough that hashing cannot be made a weapon."""

_hasher = PasswordHasher()
_UNKNOWN_USER = _hasher.hash("an account that does not exist")


def check_new(password: str, *, field: str = "password") -> str:
    if len(password) < MIN_LENGTH:
        raise InvalidArgument(f"must be at least {MIN_LENGTH} characters", field=field)
    if len(password) > MAX_LENGTH:
        raise InvalidArgument(f"must be at most {MAX_LENGTH} characters", field=field)
    return password


def _hash(password: str) -> str:
    return _hasher.hash(password)


def _verify(stored: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored or _UNKNOWN_USER, password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hash, password)


async def verify_password(stored: str | None, password: str) -> bool:
    """True when `password` matches `stored`; `stored` None (no such user) is always False."""
    return await asyncio.to_thread(_verify, stored, password)


def needs_rehash(stored: str) -> bool:
    """The hash was made with weaker parameters than today's: store a fresh one at login."""
    return _hasher.check_needs_rehash(stored)
