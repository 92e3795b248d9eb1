"""The dependency rule, read from the source: schemas <- gateway, workers <- the command line.

The gateway and the workers meet only on the bus; a worker kind never imports another kind.
Imports are found anywhere in a file (function-local ones included) and relative imports are
resolved, so a lazy `from ..proxy import x` is caught as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_KINDS = ("provisioner", "proxy", "billing")


def module_of(path: Path, root: Path = REPO_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = REPO_ROOT) -> set[str]:
    """Every module the file imports, as absolute dotted names."""
    module = module_of(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            # `from workers import proxy` imports the module workers.proxy.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def python_files(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def breaches(package: str, forbidden: tuple[str, ...]) -> dict[str, set[str]]:
    found = {}
    for path in python_files(package):
        bad = {m for m in imports_of(path) if any(is_within(m, f) for f in forbidden)}
        if bad:
            found[str(path.relative_to(REPO_ROOT))] = bad
    return found


@pytest.mark.parametrize("package", ["gateway", "workers", "bus", "schemas", "gpuproxy"])
def test_every_package_has_source_to_check(package: str) -> None:
    assert python_files(package)


def test_the_gateway_imports_neither_workers_nor_the_command_line() -> None:
    assert breaches("gateway", ("workers", "gpuproxy")) == {}


def test_workers_import_neither_the_gateway_nor_the_command_line() -> None:
    assert breaches("workers", ("gateway", "gpuproxy")) == {}


@pytest.mark.parametrize("kind", WORKER_KINDS)
def test_a_worker_kind_never_imports_another_kind(kind: str) -> None:
    others = tuple(f"workers.{k}" for k in WORKER_KINDS if k != kind)

    assert breaches(f"workers/{kind}", others) == {}


def test_workers_common_imports_no_worker_kind() -> None:
    assert breaches("workers/common", tuple(f"workers.{k}" for k in WORKER_KINDS)) == {}


def test_the_bus_imports_neither_gateway_workers_nor_the_command_line() -> None:
    assert breaches("bus", ("gateway", "workers", "gpuproxy")) == {}


def test_the_import_finder_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    # Guards the rule tests against passing because they see nothing.
    kind = tmp_path / "workers" / "proxy"
    kind.mkdir(parents=True)
    (kind / "__init__.py").write_text("from . import app\n")
    source = kind / "app.py"
    source.write_text(
        "import gateway.errors\n"
        "from workers.common import ping\n"
        "def later():\n"
        "    from ..provisioner import offers\n"
        "    from . import strategy\n"
    )

    found = imports_of(source, tmp_path)

    assert {
        "gateway.errors",
        "workers.common.ping",
        "workers.provisioner.offers",
        "workers.proxy.strategy",
    } <= found
    assert "workers.proxy.app" in imports_of(kind / "__init__.py", tmp_path)
