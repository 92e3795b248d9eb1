"""Settings from the environment: defaults, and one ConfigError naming the variable per mistake."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from gpuproxy.settings import ensure_data_dir, ensure_port_free, load, process_id
from schemas import subjects
from schemas.errors import ConfigError

# Setting -> (lowest accepted, highest accepted, below the range, above the range).
INTEGER_SETTINGS = {
    "SERVER_PORT": ("1", "65535", "0", "65536"),
    "GRPC_PORT": ("1", "65535", "0", "65536"),
    "GPUPROXY_NATS_PORT": ("0", "65535", "-1", "65536"),
    "GPUPROXY_STREAM_REPLICAS": ("1", "5", "0", "6"),
    "GPUPROXY_MAX_DELIVER": ("1", "100", "0", "101"),
    "GPUPROXY_WORKER_WINDOW": ("1", "4096", "0", "4097"),
}
SECONDS_SETTINGS = {
    "GPUPROXY_ACK_WAIT": ("0.5", "3600", "0.4", "3601"),
    "GPUPROXY_DRAIN_TIMEOUT": ("0", "3600", "-1", "3600.5"),
    "GPUPROXY_REQUEST_TIMEOUT": ("0.1", "3600", "0.05", "7200"),
}
NUMERIC_SETTINGS = {**INTEGER_SETTINGS, **SECONDS_SETTINGS}

SUBJECT_TOKEN_CHARACTERS = re.compile(r"^[A-Za-z0-9_-]+$")


def refused(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(env)
    return caught.value


def test_an_empty_environment_gives_the_embedded_defaults() -> None:
    loaded = load({})

    assert loaded.nats_url is None
    assert loaded.data_dir == Path(".gpuproxy").absolute()
    assert loaded.database_url == f"sqlite+aiosqlite:///{loaded.data_dir / 'gpuproxy.db'}"
    assert loaded.http_port == 8080
    assert loaded.grpc_port == 9090
    assert loaded.bind == "127.0.0.1"
    assert loaded.log_level == "info"


def test_the_default_sqlite_file_lives_in_the_data_dir(tmp_path: Path) -> None:
    loaded = load({"GPUPROXY_DATA_DIR": str(tmp_path)})

    assert loaded.data_dir == tmp_path
    assert loaded.database_url == f"sqlite+aiosqlite:///{tmp_path / 'gpuproxy.db'}"


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_a_numeric_setting_set_but_empty_takes_its_default(name: str) -> None:
    assert load({name: "  "}) == load({})


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
@pytest.mark.parametrize("raw", ["abc", "12abc", "0x10"])
def test_a_numeric_setting_that_is_not_a_number_names_the_setting(name: str, raw: str) -> None:
    error = refused({name: raw})

    assert error.field == name


@pytest.mark.parametrize("name", INTEGER_SETTINGS)
def test_a_whole_number_setting_refuses_a_fraction(name: str) -> None:
    error = refused({name: "2.5"})

    assert error.field == name
    assert "whole number" in error.message


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_a_numeric_setting_below_its_range_names_the_setting(name: str) -> None:
    error = refused({name: NUMERIC_SETTINGS[name][2]})

    assert error.field == name
    assert "between" in error.message


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_a_numeric_setting_above_its_range_names_the_setting(name: str) -> None:
    error = refused({name: NUMERIC_SETTINGS[name][3]})

    assert error.field == name
    assert "between" in error.message


@pytest.mark.parametrize("name", SECONDS_SETTINGS)
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_a_seconds_setting_refuses_nan_and_infinity(name: str, raw: str) -> None:
    error = refused({name: raw})

    assert error.field == name


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_a_numeric_setting_accepts_both_ends_of_its_range(name: str) -> None:
    low, high, _, _ = NUMERIC_SETTINGS[name]

    load({name: low})
    load({name: f" {high} "})


def test_ports_are_read_from_their_variables() -> None:
    loaded = load({"SERVER_PORT": "18080", "GRPC_PORT": "19090", "GPUPROXY_NATS_PORT": "14222"})

    assert (loaded.http_port, loaded.grpc_port, loaded.nats_port) == (18080, 19090, 14222)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:4222",
        "127.0.0.1:4222",
        "redis://127.0.0.1:6379",
        "nats://a:4222,http://b:4222",
    ],
)
def test_a_nats_url_with_a_bad_scheme_is_refused(url: str) -> None:
    error = refused({"NATS_URL": url})

    assert error.field == "NATS_URL"


@pytest.mark.parametrize(
    "url",
    [
        "nats://127.0.0.1:4222",
        "tls://nats.example.com:4222",
        "ws://127.0.0.1:8080",
        "wss://nats.example.com:443",
        "nats://n1:4222,nats://n2:4222,nats://n3:4222",
        "nats://n1:4222, nats://n2:4222",
    ],
)
def test_nats_urls_are_accepted_alone_or_comma_separated(url: str) -> None:
    assert load({"NATS_URL": url}).nats_url == url


def test_an_empty_nats_url_means_the_embedded_server() -> None:
    assert load({"NATS_URL": "  "}).nats_url is None


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://u:p@db:5432/gpuproxy", "postgresql+asyncpg://u:p@db:5432/gpuproxy"),
        ("postgresql://u:p@db:5432/gpuproxy", "postgresql+asyncpg://u:p@db:5432/gpuproxy"),
        ("sqlite:////var/lib/gpuproxy.db", "sqlite+aiosqlite:////var/lib/gpuproxy.db"),
        ("sqlite:///relative.db", "sqlite+aiosqlite:///relative.db"),
        ("postgresql+asyncpg://db/gpuproxy", "postgresql+asyncpg://db/gpuproxy"),
        ("sqlite+aiosqlite:////tmp/x.db", "sqlite+aiosqlite:////tmp/x.db"),
    ],
)
def test_database_urls_are_rewritten_to_the_async_drivers(given: str, used: str) -> None:
    assert load({"DATABASE_URL": given}).database_url == used


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:topsecret@db/gpuproxy",
        "postgresql+psycopg2://root:topsecret@db/gpuproxy",
        "mongodb://root:topsecret@db",
        "gpuproxy.db",
    ],
)
def test_an_unsupported_database_url_is_refused_without_echoing_it(url: str) -> None:
    error = refused({"DATABASE_URL": url})

    assert error.field == "DATABASE_URL"
    assert "topsecret" not in error.message


@pytest.mark.parametrize("level", ["loud", "trace", "critical", "1"])
def test_an_unknown_log_level_is_refused(level: str) -> None:
    error = refused({"LOG_LEVEL": level})

    assert error.field == "LOG_LEVEL"
    assert "debug, info, warning, error" in error.message


def test_a_log_level_is_read_case_insensitively() -> None:
    assert load({"LOG_LEVEL": " WARNING "}).log_level == "warning"


def test_an_unwritable_data_dir_names_the_setting(tmp_path: Path) -> None:
    # Tests run as root, for whom permissions stop nothing; a folder under a file cannot exist.
    (tmp_path / "file").write_text("not a folder")
    data_dir = tmp_path / "file" / "sub"

    with pytest.raises(ConfigError) as caught:
        ensure_data_dir(data_dir)

    assert caught.value.field == "GPUPROXY_DATA_DIR"
    assert str(data_dir) in caught.value.message


def test_a_missing_data_dir_is_created_and_left_clean(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"

    ensure_data_dir(data_dir)

    assert data_dir.is_dir()
    assert list(data_dir.iterdir()) == []


def test_a_port_held_by_a_listening_socket_names_the_setting() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        with pytest.raises(ConfigError) as caught:
            ensure_port_free("127.0.0.1", port, "SERVER_PORT")

    assert caught.value.field == "SERVER_PORT"
    assert f"127.0.0.1:{port}" in caught.value.message


def test_a_free_port_passes_the_check() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as finder:
        finder.bind(("127.0.0.1", 0))
        port = finder.getsockname()[1]

    ensure_port_free("127.0.0.1", port, "GRPC_PORT")


def test_process_ids_are_unique() -> None:
    ids = {process_id("gateway") for _ in range(1000)}

    assert len(ids) == 1000


@pytest.mark.parametrize("kind", ["gateway", "provisioner", "proxy", "billing"])
def test_a_process_id_is_one_subject_token(kind: str) -> None:
    made = process_id(kind)

    assert SUBJECT_TOKEN_CHARACTERS.match(made)
    assert subjects.TOKEN.fullmatch(made)
    assert made.startswith(f"{kind}-")


@pytest.mark.parametrize(
    "hostname",
    ["gpu-01.example.com", "gpu_node_01", "a" * 200, "host name with spaces", "UPPER.lower"],
)
def test_a_process_id_is_one_subject_token_whatever_the_hostname(
    monkeypatch: pytest.MonkeyPatch, hostname: str
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)

    made = process_id("provisioner")

    assert SUBJECT_TOKEN_CHARACTERS.match(made)
    assert subjects.TOKEN.fullmatch(made)


def test_a_process_id_is_one_subject_token_for_a_non_ascii_hostname(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "nöde-1")

    made = process_id("provisioner")

    assert SUBJECT_TOKEN_CHARACTERS.match(made)
