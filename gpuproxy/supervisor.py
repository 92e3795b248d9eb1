"""`gpuproxy up`: the gateway and one process of each worker kind, supervised.

Each child is a separate process with its output prefixed by its name. A child that dies is
started again with backoff. On Ctrl-C or SIGTERM the gateway stops first (no new calls, calls
in flight finish), then the workers drain, then the embedded nats-server stops: nothing is
left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from bus.tasks import cancel_and_wait
from schemas.subjects import WorkerKind

PARENT_PID = "GPUPROXY_SUPERVISOR_PID"
"""Set for children, so each one stops by itself if the supervisor is killed outright."""


def say(name: str, line: str) -> None:
    sys.stdout.write(f"{name:<12}| {line}\n")
    sys.stdout.flush()


@dataclass(eq=False)
class Child:
    name: str
    args: list[str]
    stop_grace: float
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self, env: Mapping[str, str]) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gpuproxy",
            *self.args,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Own session: Ctrl-C reaches only the supervisor, which stops children in order.
            start_new_session=True,
        )
        self.started = time.monotonic()
        assert self.process.stdout is not None
        self.pumps = [asyncio.create_task(self._pump(self.process.stdout))]

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            say(self.name, raw.decode(errors="replace").rstrip())

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.stop_grace)
        except TimeoutError:
            say("supervisor", f"{self.name} did not stop in {self.stop_grace:g}s; killing it")
            process.kill()
            await process.wait()
        await asyncio.gather(*self.pumps, return_exceptions=True)


async def supervise(
    env: Mapping[str, str],
    *,
    drain_timeout: float,
    env_of: Mapping[str, Mapping[str, str]] | None = None,
) -> int:
    """`env_of`: settings of one child only, by its name (its own NATS credentials)."""
    children = [Child("gateway", ["gateway"], stop_grace=20.0)] + [
        Child(str(kind), ["worker", str(kind)], stop_grace=drain_timeout + 10.0)
        for kind in WorkerKind
    ]
    shared = {**env, PARENT_PID: str(os.getpid())}
    envs = {child.name: {**shared, **(env_of or {}).get(child.name, {})} for child in children}
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)

    for child in children:
        await child.start(envs[child.name])
    watchers = [
        asyncio.create_task(_keep_running(child, envs[child.name], stopping)) for child in children
    ]
    await stopping.wait()
    say("supervisor", "stopping: gateway first, then workers drain")
    await cancel_and_wait(watchers)
    await children[0].stop()
    await asyncio.gather(*(child.stop() for child in children[1:]))
    return 0


async def _keep_running(child: Child, env: Mapping[str, str], stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        assert child.process is not None
        code = await child.process.wait()
        await asyncio.gather(*child.pumps, return_exceptions=True)
        if stopping.is_set():
            return
        # Back off when it keeps dying at start; a child that ran a while starts at once.
        uptime = time.monotonic() - child.started
        child.restarts = 0 if uptime > 30 else child.restarts + 1
        delay = min(0.5 * 2**child.restarts, 15.0) if child.restarts else 0.2
        say("supervisor", f"{child.name} exited with {code}; starting it again in {delay:g}s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        if not stopping.is_set():
            await child.start(env)
