"""The processes a scenario needs: a fresh nats-server, child Python processes, free ports.

Everything started here is stopped in a `finally`, so an error or a Ctrl-C in the middle
of a run leaves no server or worker behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from gpuproxy.natsd import NatsServer

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_SECONDS = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def nats_server(workdir: Path) -> Iterator[NatsServer]:
    """A nats-server of its own on a loopback port, its JetStream store under `workdir`."""
    with (workdir / "nats-server.log").open("w") as log:
        server = NatsServer(
            workdir / "jetstream",
            host="127.0.0.1",
            log_line=lambda line: print(line, file=log, flush=True),
            name="gpuproxy-bench",
        )
        try:
            server.start()
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def child_process(
    args: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path = REPO_ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process with its output in `log_path`; SIGTERM at the end, SIGKILL if it hangs.

    A session of its own keeps a terminal's Ctrl-C away from the child: the bench decides
    when its children stop, and in which order.
    """
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(args),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: ours, plus how to notice that we are gone.

    gpuproxy's processes stop on their own when GPUPROXY_SUPERVISOR_PID's process is no
    longer their parent, which covers the bench being killed outright (SIGKILL).
    """
    return {**os.environ, "GPUPROXY_SUPERVISOR_PID": str(os.getpid()), **extra}


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
