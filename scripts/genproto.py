"""Regenerate the Python gRPC code in gateway/pb/ from proto/gpuproxy.proto.

Run from anywhere: ``.venv/bin/python scripts/genproto.py`` (or ``just proto``). The output is
deterministic, so CI can regenerate and fail on ``git status --porcelain``.
"""

from __future__ import annotations

import importlib.resources
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]  # ships no type information

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"
OUT_DIR = REPO_ROOT / "gateway" / "pb"
PROTO_FILES = ("gpuproxy.proto",)

# protoc writes imports relative to -I; the package lives at gateway.pb.
GRPC_MODULE = OUT_DIR / "gpuproxy_pb2_grpc.py"
FLAT_IMPORT = "import gpuproxy_pb2 as gpuproxy__pb2\n"
PACKAGE_IMPORT = "from gateway.pb import gpuproxy_pb2 as gpuproxy__pb2\n"
GRPC_STUB = OUT_DIR / "gpuproxy_pb2_grpc.pyi"
FLAT_STUB_IMPORT = "import gpuproxy_pb2 as _gpuproxy_pb2\n"
PACKAGE_STUB_IMPORT = "from gateway.pb import gpuproxy_pb2 as _gpuproxy_pb2\n"

PACKAGE_INIT = OUT_DIR / "__init__.py"
PACKAGE_DOCSTRING = '"""Generated code, do not edit: regenerate with `just proto`."""\n'

GENERATED_GLOBS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")


class GenerationError(RuntimeError):
    """Code generation failed; the message says why."""


def bundled_include_dir() -> Path:
    """The well-known .proto files (google/protobuf/*.proto) that grpc_tools ships."""
    return Path(str(importlib.resources.files("grpc_tools") / "_proto"))


def find_mypy_plugin() -> Path | None:
    """protoc-gen-mypy next to this interpreter, else on PATH; None when not installed."""
    beside_python = Path(sys.executable).parent / "protoc-gen-mypy"
    if beside_python.is_file():
        return beside_python
    on_path = shutil.which("protoc-gen-mypy")
    return Path(on_path) if on_path else None


def protoc_args(mypy_plugin: Path | None) -> list[str]:
    """The full protoc command line; stub generator is mypy-protobuf, else protoc's own pyi."""
    out = str(OUT_DIR)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{bundled_include_dir()}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
    ]
    if mypy_plugin is not None:
        grpc_plugin = mypy_plugin.with_name("protoc-gen-mypy_grpc")
        args += [f"--plugin=protoc-gen-mypy={mypy_plugin}", f"--mypy_out={out}"]
        # Typed stubs for the service classes, so the servicer is checked under mypy strict.
        args += [f"--plugin=protoc-gen-mypy_grpc={grpc_plugin}", f"--mypy_grpc_out={out}"]
    else:
        args.append(f"--pyi_out={out}")
    return args + [str(PROTO_DIR / name) for name in PROTO_FILES]


def remove_stale_outputs() -> None:
    """Delete earlier generated files so a removed .proto leaves nothing behind."""
    for pattern in GENERATED_GLOBS:
        for path in OUT_DIR.glob(pattern):
            path.unlink()


def run_protoc(args: list[str]) -> None:
    exit_code: int = protoc.main(args)
    if exit_code != 0:
        raise GenerationError(f"protoc exited with status {exit_code} (its errors are above)")


def make_grpc_import_package_relative() -> None:
    rewrites = [(GRPC_MODULE, FLAT_IMPORT, PACKAGE_IMPORT)]
    if GRPC_STUB.exists():
        rewrites.append((GRPC_STUB, FLAT_STUB_IMPORT, PACKAGE_STUB_IMPORT))
    for path, flat, packaged in rewrites:
        text = path.read_text(encoding="utf-8")
        if flat not in text:
            raise GenerationError(f"expected {flat.strip()!r} in {path}")
        path.write_text(text.replace(flat, packaged), encoding="utf-8")


def generate() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    mypy_plugin = find_mypy_plugin()
    if mypy_plugin is None:
        print("protoc-gen-mypy not found; writing protoc's own .pyi stubs instead", file=sys.stderr)
    remove_stale_outputs()
    run_protoc(protoc_args(mypy_plugin))
    make_grpc_import_package_relative()
    PACKAGE_INIT.write_text(PACKAGE_DOCSTRING, encoding="utf-8")


def main() -> int:
    try:
        generate()
    except GenerationError as error:
        print(f"genproto: {error}", file=sys.stderr)
        return 1
    print(f"genproto: wrote {OUT_DIR.relative_to(REPO_ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
