#!/usr/bin/env python3
"""Run gpuproxy from a checkout with nothing but Python >= 3.11 installed.

    python3 scripts/dev.py up        start the whole system on embedded defaults
    python3 scripts/dev.py test      run the whole test suite (extra args go to pytest)
    python3 scripts/dev.py lint      ruff and mypy strict
    python3 scripts/dev.py proto     regenerate the gRPC code from proto/
    python3 scripts/dev.py bench     the benchmarks
    python3 scripts/dev.py run ...   any command inside the project's virtual environment

The first call creates `.venv` beside the checkout and installs the project with its
development tools into it; later calls reuse it, and reinstall only when pyproject.toml
changed. Standard library only: this runs before anything else is installed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("GPUPROXY_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".gpuproxy-installed"


def _fingerprint() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this file runs before any check can
        sys.exit("gpuproxy needs Python 3.11 or newer; this is " + sys.version.split()[0])
    if STAMP.exists() and STAMP.read_text() == _fingerprint() and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"dev: creating {VENV}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev: installing gpuproxy and its development tools", file=sys.stderr)
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "-U", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(_fingerprint())


def run(args: list[str]) -> int:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    child = subprocess.Popen(args, cwd=ROOT, env=env)
    # SIGTERM goes on to the child; Ctrl-C reaches it directly (same process group). Either
    # way the child stops in its own order, and this waits for it instead of killing it.
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    task, rest = argv[0], argv[1:]
    ensure_venv()
    py = str(PYTHON)
    match task:
        case "up":
            return run([str(BIN / "gpuproxy"), "up", *rest])
        case "test":
            return run([py, "-m", "pytest", *rest])
        case "lint":
            return (
                run([py, "-m", "ruff", "check", "."])
                or run([py, "-m", "ruff", "format", "--check", "."])
                or run([py, "-m", "mypy"])
            )
        case "proto":
            return run([py, "scripts/genproto.py"])
        case "bench":
            return run([py, "-m", "bench", *rest])
        case "run":
            return run(rest)
    print(f"dev: unknown task {task!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
