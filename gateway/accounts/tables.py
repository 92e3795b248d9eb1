"""The SQL tables of accounts. Migrations create them; these models read and write them."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    """Stored lower-cased: one account per address, however it is typed."""
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean)
    rate_limit_per_minute: Mapped[int] = mapped_column(Integer)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    ip_mode: Mapped[str] = mapped_column(String(16), default="disabled")
    ip_audit: Mapped[bool] = mapped_column(Boolean, default=False)


class RefreshToken(Base):
    """One link of a session's rotation chain; only a digest of its secret is kept."""

    __tablename__ = "refresh_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    family: Mapped[str] = mapped_column(String(32), index=True)
    """The id of the chain's first token: reuse of a rotated token revokes the whole chain."""
    digest: Mapped[str] = mapped_column(String(64))
    expires_at_ms: Mapped[int] = mapped_column(BigInteger)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    used_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    revoked_at_ms: Mapped[int | None] = mapped_column(BigInteger)


class ApiKey(Base):
    """An API key: found by its public id, checked against the digest of its secret."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    """The public id, the middle part of `gpuproxy_<public id>_<secret>`."""
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    digest: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[str] = mapped_column(String(200))
    """Space-separated, sorted."""
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    expires_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    last_used_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    revoked_at_ms: Mapped[int | None] = mapped_column(BigInteger)


class IpRuleRow(Base):
    """One entry of a user's allowlist or denylist."""

    __tablename__ = "ip_rules"
    __table_args__ = (UniqueConstraint("user_id", "list", "cidr"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    list: Mapped[str] = mapped_column(String(8))
    """`allow` or `deny`."""
    cidr: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(200))
    expires_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class IpAccessLogRow(Base):
    """One decision on a user's address lists."""

    __tablename__ = "ip_access_log"
    __table_args__ = (Index("ix_ip_access_log_user_at", "user_id", "at_ms"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(64))
    allowed: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(200))
    at_ms: Mapped[int] = mapped_column(BigInteger)


class GpuPreferenceRow(Base):
    """A user's defaults for reservations, as JSON (`gateway.gpus.preferences.Preferences`)."""

    __tablename__ = "gpu_preferences"

    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    body: Mapped[str] = mapped_column(Text)
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)
