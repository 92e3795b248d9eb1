"""A local GPU marketplace: a fixed catalogue of offers whose machines are real processes.

Renting an offer starts `gpuproxy sim-upstream` (an OpenAI-compatible server with
deterministic tokens, see `simulator.upstream`) on a free local port. Its state lives in files
under `state_dir`, never in memory, because several provisioner processes share one
marketplace and any of them may be SIGKILLed and started again:

    state_dir/market.lock           flock'd around every capacity check + rent
    state_dir/machines/<id>.json    one record per machine, written atomically
    state_dir/logs/<id>.log         the machine's stdout and stderr

A machine runs in a session of its own, so a signal to its renter's process group (Ctrl-C)
does not reach it: like a cloud machine, it outlives the process that rented it. It ends when
it is destroyed, when it crashes (failure injection), or when its *owner* process ends (the
supervisor of `gpuproxy up`, or the test run), so nothing leaks.

A machine holds capacity while its process runs; a machine whose process ended stays recorded
(reported as exited, with the last line of its log) until it is destroyed.

Launch `env` keys the marketplace reads (every key is also passed to the process, as a real
machine's container would see it):

    SIM_MODEL            the model name it serves           (--model)
    SIM_TTFT_MS          delay before the first token       (--ttft-ms)
    SIM_TOKEN_DELAY_MS   delay between two tokens           (--token-delay-ms)
    SIM_FAIL             refuse | slow | cut | die          (--fail)
    SIM_FAIL_RATE        fraction of requests that fail     (--fail-rate)
    SIM_SLOW_MS          the extra delay of `slow`          (--slow-ms)
    SIM_FAIL_AFTER       tokens sent before `cut` / `die`   (--fail-after)
    SIM_BOOT_DELAY_MS    wait this long before listening: a slow boot (--boot-delay-ms)
    SIM_BOOT_FAIL=1      exit right after start: a failed boot (--boot-fail)

Values are checked by the machine when it boots, as a container checks its own environment:
a bad one makes it exit at once, with the reason as the last line of its log.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

OWNER_PID_ENV = "GPUPROXY_SIM_OWNER_PID"
"""Read by `gpuproxy sim-upstream` when no `--owner-pid` is given."""

LAUNCH_OPTIONS: dict[str, str] = {
    "SIM_MODEL": "--model",
    "SIM_TTFT_MS": "--ttft-ms",
    "SIM_TOKEN_DELAY_MS": "--token-delay-ms",
    "SIM_FAIL": "--fail",
    "SIM_FAIL_RATE": "--fail-rate",
    "SIM_SLOW_MS": "--slow-ms",
    "SIM_FAIL_AFTER": "--fail-after",
    "SIM_BOOT_DELAY_MS": "--boot-delay-ms",
}
"""Launch env keys that become options of the machine's server."""

BOOT_FAIL_KEY = "SIM_BOOT_FAIL"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})

STOP_GRACE = 1.0
"""Seconds a destroyed machine gets between SIGTERM and SIGKILL."""

_MACHINE_ID = re.compile(r"sim-m-[0-9a-f]{12}")


class Offer(msgspec.Struct, frozen=True, kw_only=True):
    offer_id: str
    gpu_model: str
    num_gpus: int
    vram_gb: int
    """Memory of one GPU, in GB."""
    price_per_hour_micros: int
    """The whole offer (every GPU of it) per hour."""
    location: str
    capacity: int
    """Machines of this offer that may run at once."""


CATALOGUE: tuple[Offer, ...] = tuple(
    Offer(
        offer_id=offer_id,
        gpu_model=gpu_model,
        num_gpus=num_gpus,
        vram_gb=vram_gb,
        price_per_hour_micros=price,
        location=location,
        capacity=capacity,
    )
    for offer_id, gpu_model, num_gpus, vram_gb, price, location, capacity in (
        ("sim-rtx3090-24g-eu-nl", "RTX 3090", 1, 24, 220_000, "EU-NL", 8),
        ("sim-rtx4090-24g-us-ca", "RTX 4090", 1, 24, 350_000, "US-CA", 8),
        ("sim-rtx4090-24g-x2-ap-sg", "RTX 4090", 2, 24, 720_000, "AP-SG", 4),
        ("sim-l4-24g-us-tx", "L4", 1, 24, 440_000, "US-TX", 8),
        ("sim-a10g-24g-us-ca", "A10G", 1, 24, 760_000, "US-CA", 8),
        ("sim-l40s-48g-eu-de", "L40S", 1, 48, 990_000, "EU-DE", 6),
        ("sim-a100-40g-us-tx", "A100 PCIE", 1, 40, 1_100_000, "US-TX", 6),
        ("sim-a100-80g-x4-eu-nl", "A100 SXM4", 4, 80, 6_400_000, "EU-NL", 2),
        ("sim-h100-80g-eu-de", "H100 SXM", 1, 80, 2_500_000, "EU-DE", 8),
        ("sim-h100-80g-x8-us-ca", "H100 SXM", 8, 80, 19_200_000, "US-CA", 2),
    )
)
"""Ten offers of seven GPU models in five regions, priced near public market rates."""


class MachineRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One rented machine, as its file in `state_dir/machines` holds it."""

    id: str
    label: str
    offer_id: str
    pid: int
    start_ticks: int = 0
    """The process's start time in clock ticks since boot (Linux `/proc`; 0: unknown), so a
    later process that happens to reuse the pid is never taken for it, nor signalled."""
    host: str
    port: int
    created_at_ms: int
    options: dict[str, str] = {}
    """The launch env keys the marketplace read (see `LAUNCH_OPTIONS`); other env keys are
    not recorded, as they may hold secrets."""

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"


class MarketError(Exception):
    """The marketplace refuses a request; the message says why."""


class OfferUnavailable(MarketError):
    pass


_PROC = Path("/proc")
_HAS_PROC = (_PROC / "self" / "stat").exists()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of a process from /proc, or None when there is none."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may itself hold spaces and parentheses.
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[19])


def _reap(pid: int) -> None:
    """Collect the exit status of our own ended child, so it does not stay a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def process_alive(pid: int, start_ticks: int = 0) -> bool:
    """Whether process `pid` runs: it exists, is no zombie, and, given `start_ticks`, is the
    process that started then rather than a later one reusing the number."""
    if pid <= 0:
        return False
    if not _HAS_PROC:
        _reap(pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return False
    state, ticks = stat
    if start_ticks and ticks != start_ticks:
        return False
    if state in ("Z", "X"):
        _reap(pid)
        return False
    return True


def _free_port(host: str, taken: set[int]) -> int:
    while True:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
        if port not in taken:
            return port


def _server_args(env: Mapping[str, str]) -> list[str]:
    args: list[str] = []
    for key, option in LAUNCH_OPTIONS.items():
        if key in env:
            args += [option, env[key]]
    if env.get(BOOT_FAIL_KEY, "").strip().lower() in TRUE_WORDS:
        args.append("--boot-fail")
    return args


class Market:
    """The marketplace in `state_dir`; any number of instances, in any number of processes,
    may work on one directory at once.

    Every method blocks on files and processes (briefly; `destroy` up to about
    `STOP_GRACE` seconds): call it from a thread when on an event loop.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        catalogue: Sequence[Offer] = CATALOGUE,
        owner_pid: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        """`owner_pid`: the process whose end stops every machine rented here; 0: none
        given, so a machine takes `GPUPROXY_SIM_OWNER_PID` from the environment, if set,
        and otherwise lives until it is destroyed."""
        self.state_dir = state_dir
        self.catalogue = {offer.offer_id: offer for offer in catalogue}
        self.owner_pid = owner_pid
        self.host = host
        self._machines = state_dir / "machines"
        self._logs = state_dir / "logs"
        self._machines.mkdir(parents=True, exist_ok=True)
        self._logs.mkdir(parents=True, exist_ok=True)

    def availability(self) -> list[tuple[Offer, int]]:
        """Every offer with capacity left, and how many more machines it can take."""
        running = self._running_per_offer()
        found = []
        for offer in self.catalogue.values():
            left = offer.capacity - running.get(offer.offer_id, 0)
            if left > 0:
                found.append((offer, left))
        return found

    def rent(self, offer_id: str, *, label: str, env: Mapping[str, str]) -> MachineRecord:
        """Start a machine of `offer_id`; raises `OfferUnavailable` when the offer is unknown
        or every machine of it is taken. The machine may still be booting when this returns."""
        offer = self.catalogue.get(offer_id)
        if offer is None:
            raise OfferUnavailable(f"offer {offer_id} is no longer available (no such offer)")
        with self._locked():
            running = self._running_per_offer().get(offer_id, 0)
            if running >= offer.capacity:
                raise OfferUnavailable(
                    f"offer {offer_id} is no longer available "
                    f"(all {offer.capacity} of its machines are rented)"
                )
            machine_id = f"sim-m-{secrets.token_hex(6)}"
            port = _free_port(self.host, {record.port for record in self.machines()})
            pid = self._spawn(machine_id, port, env)
            stat = _proc_stat(pid)
            record = MachineRecord(
                id=machine_id,
                label=label,
                offer_id=offer_id,
                pid=pid,
                start_ticks=stat[1] if stat else 0,
                host=self.host,
                port=port,
                created_at_ms=time.time_ns() // 1_000_000,
                options={k: v for k, v in env.items() if k in LAUNCH_OPTIONS or k == BOOT_FAIL_KEY},
            )
            self._write(record)
        return record

    def machine(self, machine_id: str) -> MachineRecord | None:
        if not _MACHINE_ID.fullmatch(machine_id):
            return None
        return self._read(self._machines / f"{machine_id}.json")

    def machines(self) -> list[MachineRecord]:
        """Every recorded machine, running or ended, oldest first."""
        found = [self._read(path) for path in self._machines.glob("sim-m-*.json")]
        return sorted((r for r in found if r is not None), key=lambda r: r.created_at_ms)

    def running(self, record: MachineRecord) -> bool:
        return process_alive(record.pid, record.start_ticks)

    def exit_note(self, record: MachineRecord) -> str:
        """Why an ended machine ended: the last line it wrote."""
        path = self._logs / f"{record.id}.log"
        try:
            with path.open("rb") as handle:
                handle.seek(max(0, path.stat().st_size - 2048))
                tail = handle.read().decode(errors="replace")
        except OSError:
            tail = ""
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        return lines[-1] if lines else "its process ended without a word"

    def destroy(self, machine_id: str) -> None:
        """Stop the machine and forget it; an unknown or already destroyed one is fine."""
        record = self.machine(machine_id)
        if record is None:
            return
        # Stop first, forget after: a renter killed in between finds the record and retries.
        self._stop(record)
        with self._locked():
            (self._machines / f"{machine_id}.json").unlink(missing_ok=True)
            (self._logs / f"{machine_id}.log").unlink(missing_ok=True)

    def _running_per_offer(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.machines():
            if self.running(record):
                counts[record.offer_id] = counts.get(record.offer_id, 0) + 1
        return counts

    def _spawn(self, machine_id: str, port: int, env: Mapping[str, str]) -> int:
        argv = [sys.executable, "-m", "gpuproxy", "sim-upstream"]
        argv += ["--host", self.host, "--port", str(port), *_server_args(env)]
        if self.owner_pid:
            argv += ["--owner-pid", str(self.owner_pid)]
        log_path = self._logs / f"{machine_id}.log"
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        # posix_spawn rather than subprocess.Popen: the machine must outlive us, and a Popen
        # object that is dropped while its process still runs warns and keeps a handle.
        return os.posix_spawn(
            sys.executable,
            argv,
            {**os.environ, **env},
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log_path), flags, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )

    def _stop(self, record: MachineRecord) -> None:
        for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5.0)):
            if not self.running(record):
                return
            # Its own session, so its process group id is its pid.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, sig)
            deadline = time.monotonic() + grace
            while self.running(record) and time.monotonic() < deadline:
                time.sleep(0.02)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock is held per open file, so threads of one process exclude each other too.
        with (self.state_dir / "market.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, record: MachineRecord) -> None:
        path = self._machines / f"{record.id}.json"
        temporary = path.with_name(f".{record.id}.{os.getpid()}.tmp")
        temporary.write_bytes(msgspec.json.encode(record))
        os.replace(temporary, path)

    def _read(self, path: Path) -> MachineRecord | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(raw, type=MachineRecord)
        except msgspec.DecodeError as exc:
            log.warning("sim market: ignoring unreadable machine record %s: %s", path.name, exc)
            return None
