"""Access: API keys, per-user address lists and their access log.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _owner() -> sa.Column[str]:
    return sa.Column(
        "user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )


def upgrade() -> None:
    with op.batch_alter_table("users") as users:
        users.add_column(
            sa.Column("ip_mode", sa.String(16), nullable=False, server_default="disabled")
        )
        users.add_column(
            sa.Column("ip_audit", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(16), primary_key=True),
        _owner(),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("scopes", sa.String(200), nullable=False),
        sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_used_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("revoked_at_ms", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    op.create_table(
        "ip_rules",
        sa.Column("id", sa.String(32), primary_key=True),
        _owner(),
        sa.Column("list", sa.String(8), nullable=False),
        sa.Column("cidr", sa.String(64), nullable=False),
        sa.Column("description", sa.String(200), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("user_id", "list", "cidr"),
    )
    op.create_index("ix_ip_rules_user_id", "ip_rules", ["user_id"])
    op.create_table(
        "ip_access_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        _owner(),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("endpoint", sa.String(200), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_ip_access_log_user_at", "ip_access_log", ["user_id", "at_ms"])


def downgrade() -> None:
    op.drop_table("ip_access_log")
    op.drop_table("ip_rules")
    op.drop_table("api_keys")
    with op.batch_alter_table("users") as users:
        users.drop_column("ip_audit")
        users.drop_column("ip_mode")
