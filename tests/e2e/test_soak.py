"""Sustained traffic while worker processes are killed and restarted.

The short variant runs with the suite; `just test-soak` runs the long one. Both count effects,
not answers: each worker notes every ping it ran to completion, and a command may have run
more than once only where the worker of the earlier run was killed before its outcome was
stored (a real handler's effect is idempotent by its command id, so that second run finds
nothing left to do).
"""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from tests.e2e.processes import gpuproxy, keyed_channel, parts_env, provisioned, wait_serving
from tests.e2e.test_worker_crash import first_answer
from workers.common.ping import JOURNAL

SOAK_SECONDS = float(os.environ.get("GPUPROXY_SOAK_SECONDS", "120"))


@pytest.mark.parametrize(
    "seconds",
    [
        pytest.param(12.0, id="short", marks=pytest.mark.slow),
        pytest.param(SOAK_SECONDS, id="long", marks=pytest.mark.soak),
    ],
)
def test_every_command_runs_to_completion_once_while_workers_keep_dying(
    nats_url: str, tmp_path: Path, seconds: float
) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    env, target = parts_env(
        tmp_path,
        nats_url,
        GPUPROXY_ACK_WAIT="1",
        GPUPROXY_MAX_DELIVER="100",
        LOG_LEVEL="warning",
        **{JOURNAL: str(journal)},
    )
    chaos = random.Random(7)
    killed: set[int] = set()
    with (
        gpuproxy(["gateway"], env, tmp_path / "gateway.log") as gateway,
        gpuproxy(["worker", "provisioner"], env, tmp_path / "steady.log"),
        keyed_channel(target, provisioned(env)) as channel,
        ThreadPoolExecutor(8) as pool,
    ):
        wait_serving(target, gateway, tmp_path / "gateway.log")
        stub = pb_grpc.GPUProxyServiceStub(channel)
        first_answer(stub)
        before = _runs(journal)
        sent = 0
        calls = []
        deadline = time.monotonic() + seconds
        generation = 0
        while time.monotonic() < deadline:
            generation += 1
            log = tmp_path / f"victim-{generation}.log"
            with gpuproxy(["worker", "provisioner"], env, log) as victim:
                until = time.monotonic() + chaos.uniform(1.0, 4.0)
                while time.monotonic() < until:
                    key = (("idempotency-key", f"soak-{sent}"),)
                    request = pb.PingRequest(message=str(sent), delay_ms=chaos.randint(0, 300))
                    calls.append(pool.submit(stub.Ping, request, metadata=key, timeout=120))
                    sent += 1
                    time.sleep(0.01)
                victim.kill()
                victim.wait()
                killed.add(victim.pid)
        answers = [call.result() for call in calls]
    runs = _runs(journal)
    for command_id in before:
        runs.pop(command_id, None)
    assert sorted(int(a.message) for a in answers) == list(range(sent))
    assert any(a.attempt > 1 for a in answers), "no command was ever redelivered"
    assert len(runs) == sent, "a command was answered without running"
    for command_id, pids in runs.items():
        # Every run but the last was cut short by its worker's death.
        assert all(pid in killed for pid in pids[:-1]), (command_id, pids)


def _runs(journal: Path) -> dict[str, list[int]]:
    """The processes that ran each command to completion, in the order they did."""
    found: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for path in journal.glob("*.log"):
        for line in path.read_text().splitlines():
            command_id, _attempt, pid, at = line.split()
            found[command_id].append((int(at), int(pid)))
    return {command_id: [pid for _, pid in sorted(runs)] for command_id, runs in found.items()}
