"""Applying the SQL migrations to the configured database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from schemas.errors import Unavailable

MIGRATIONS = Path(__file__).parent / "migrations"


def _config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would read a '%' in a password as a placeholder.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str) -> None:
    """Bring the schema to the newest revision; running it again changes nothing."""
    try:
        command.upgrade(_config(database_url), "head")
    except Exception as exc:
        # The driver's message may quote the URL, password included: give the type only.
        raise Unavailable(
            f"cannot migrate the database: {type(exc).__name__}", field="DATABASE_URL"
        ) from None


def head() -> str | None:
    """The newest revision this version of gpuproxy knows."""
    return ScriptDirectory.from_config(_config("sqlite://")).get_current_head()
