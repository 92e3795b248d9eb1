"""The LiteLLM proxy the peer scenario measures, installed once into a virtual environment.

LiteLLM is not a dependency of gpuproxy and must not become one (its proxy extra pulls in
well over a hundred packages), so the bench installs it for itself, pinned, into
`$XDG_CACHE_HOME/gpuproxy-bench/litellm-venv` (`~/.cache/...` without it): `python -m venv`,
then pip from PyPI. That takes minutes, once; later runs find the venv and reuse it. A file
in the venv records the requirement it was made for: a venv without it (an install that was
interrupted) or made for another pin is made again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

REQUIREMENT = "litellm[proxy]==1.108.7"
"""Pinned: a peer's figures mean something only for a known version. The newest release
whose proxy extra resolved from the package index this was written against: 1.110 needs a
`litellm-proxy` package it did not offer, and 1.108.8 to 1.108.14 post releases of
`litellm-enterprise` and `litellm-proxy-extras` it did not have either."""
INSTALL_SECONDS = 1200.0
"""pip resolving and unpacking LiteLLM's proxy extra on a slow, shared machine."""
_MARKER = "gpuproxy-bench-requirement.txt"


class PeerUnavailable(RuntimeError):
    """The peer could not be installed or started here; the message says why."""


def venv_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gpuproxy-bench" / "litellm-venv"


def installed(venv: Path) -> bool:
    marker = venv / _MARKER
    return marker.is_file() and marker.read_text().strip() == REQUIREMENT


async def ensure_litellm(say: Callable[[str], None], venv: Path | None = None) -> Path:
    """The `litellm` command of a venv holding REQUIREMENT, installing it first if needed."""
    venv = venv or venv_dir()
    command = venv / "bin" / "litellm"
    if installed(venv) and command.exists():
        return command
    say(f"installing {REQUIREMENT} into {venv} (once; this may take minutes)")
    if venv.exists():
        shutil.rmtree(venv)  # an interrupted install, or another pin
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "litellm-install.log"
    with log.open("wb") as out:
        await _step([sys.executable, "-m", "venv", str(venv)], out, log, "make the venv")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        await _step([*pip, "install", "--quiet", REQUIREMENT], out, log, "pip install")
    if not command.exists():
        raise PeerUnavailable(f"{REQUIREMENT} installed, but {command} is missing")
    (venv / _MARKER).write_text(REQUIREMENT + "\n")
    say(f"installed {REQUIREMENT}")
    return command


async def _step(args: list[str], out: IO[bytes], log: Path, what: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(INSTALL_SECONDS):
            code = await process.wait()
    except TimeoutError:
        raise PeerUnavailable(
            f"could not {what} for {REQUIREMENT} within {INSTALL_SECONDS:.0f} s; see {log}"
        ) from None
    finally:
        if process.returncode is None:
            # A timeout or the run's own cancellation: pip must not outlive the bench.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    if code != 0:
        raise PeerUnavailable(
            f"could not {what} for {REQUIREMENT} (exit {code}); last lines of {log}:\n" + _tail(log)
        )


def _tail(path: Path, lines: int = 12) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
