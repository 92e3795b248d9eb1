"""Baseline: the versioned, empty schema every later migration builds on.

Stamping it gives a fresh database its `alembic_version` row, so the first feature migration
runs as an upgrade like every other.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing to create: tables arrive with the features that own them."""


def downgrade() -> None:
    """Nothing to drop."""
