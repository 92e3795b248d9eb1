"""The first admin: made once, from settings or with a password shown once."""

from __future__ import annotations

import pytest

from gpuproxy import first_admin
from schemas.errors import ConfigError


def test_a_generated_admin_password_is_returned_once(migrated_database: str) -> None:
    made = first_admin.ensure(migrated_database, {})
    assert made is not None
    assert made[0] == first_admin.DEFAULT_EMAIL
    assert len(made[1]) >= 20
    assert first_admin.ensure(migrated_database, {}) is None


def test_an_admin_from_settings_is_not_echoed_back(migrated_database: str) -> None:
    env = {
        "GPUPROXY_ADMIN_EMAIL": "root@example.com",
        "GPUPROXY_ADMIN_PASSWORD": "a long admin pass",
    }
    assert first_admin.ensure(migrated_database, env) is None


@pytest.mark.parametrize(
    ("env", "field"),
    [
        (
            {"GPUPROXY_ADMIN_EMAIL": "root", "GPUPROXY_ADMIN_PASSWORD": "a long admin pass"},
            "GPUPROXY_ADMIN_EMAIL",
        ),
        (
            {"GPUPROXY_ADMIN_EMAIL": "root@example.com", "GPUPROXY_ADMIN_PASSWORD": "short"},
            "GPUPROXY_ADMIN_PASSWORD",
        ),
    ],
)
def test_bad_admin_settings_name_the_variable_and_create_nothing(
    migrated_database: str, env: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        first_admin.ensure(migrated_database, env)
    assert raised.value.field == field
    assert "a long admin pass" not in raised.value.message
    assert first_admin.ensure(migrated_database, {}) is not None
