"""One run: each selected scenario on fresh servers, one after the other, then the report."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.measure import Driver, Plan, Session
from bench.report import RunReport, ScenarioResult, build_report
from bench.scenarios import Scenario
from bench.study import Measured, Say, Study
from gpuproxy.natsd import find_binary


async def run_scenario(scenario: Scenario, plan: Plan, *, progress: bool = True) -> ScenarioResult:
    started = time.perf_counter()
    say = _progress if progress else _quiet
    say(f"{scenario.name}: starting ({scenario.title})")
    try:
        with tempfile.TemporaryDirectory(prefix=f"gpuproxy-bench-{scenario.name}-") as tmp:
            async with scenario.open(Path(tmp), plan) as session:
                if isinstance(session, Study):
                    measured = await session.measure(lambda line: say(f"{scenario.name}: {line}"))
                else:
                    measured = await _two_phases(scenario.name, session, plan, say)
    except Exception as exc:
        # One broken path must not hide the others' numbers; it is reported as FAILED.
        cause = _first_leaf(exc)
        reason = str(cause)
        if isinstance(cause, TimeoutError) and not reason:
            reason = (
                f"timed out (a call allows {plan.call_timeout:g} s, a phase "
                f"{plan.phase_timeout:g} s)"
            )
        say(f"{scenario.name}: FAILED ({type(cause).__name__})")
        return ScenarioResult(
            name=scenario.name,
            title=scenario.title,
            what=scenario.what,
            error=f"{type(cause).__name__}: {reason or 'no message'}",
            wall_seconds=time.perf_counter() - started,
        )
    return ScenarioResult(
        name=scenario.name,
        title=scenario.title,
        what=scenario.what,
        latency=measured.latency,
        throughput=measured.throughput,
        cpu_us_c1=measured.cpu_us_c1,
        cpu_us_c32=measured.cpu_us_c32,
        findings=measured.findings,
        wall_seconds=time.perf_counter() - started,
    )


async def _two_phases(name: str, session: Session, plan: Plan, say: Say) -> Measured:
    driver = Driver(session, plan)
    latency, cpu_c1 = await driver.latency()
    say(f"{name}: c=1 p50 {latency.p50_ms:.2f} ms")
    throughput, cpu_c32 = await driver.throughput()
    say(f"{name}: c={plan.concurrency} {throughput.calls_per_s:,.0f} calls/s")
    return Measured(latency, throughput, cpu_c1, cpu_c32)


async def run(
    scenarios: Sequence[Scenario], plan: Plan, *, mode: str, progress: bool = True
) -> RunReport:
    # SIGTERM ends the run like Ctrl-C does: through every `finally`, children stopped.
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
    results = [await run_scenario(s, plan, progress=progress) for s in scenarios]
    return build_report(_meta(plan, mode), results)


def _first_leaf(exc: BaseException) -> BaseException:
    # A failing lane of the concurrent phase arrives wrapped in the TaskGroup's group.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _meta(plan: Plan, mode: str) -> dict[str, Any]:
    return {
        "mode": mode,
        "plan": {
            "warmup": plan.warmup,
            "latency_calls": plan.latency_calls,
            "throughput_calls": plan.throughput_calls,
            "throughput_rounds": plan.throughput_rounds,
            "concurrency": plan.concurrency,
        },
        "plan_text": (
            f"c=1: {plan.latency_calls} sequential calls after {plan.warmup} warm-up; "
            f"c={plan.concurrency}: {plan.throughput_calls} calls over {plan.concurrency} "
            f"tasks{_rounds(plan.throughput_rounds)} after {plan.warmup} warm-up; "
            "every answer checked"
        ),
        "python": platform.python_version(),
        "uvloop": _version("uvloop"),
        "grpcio": _version("grpcio"),
        "nats_py": _version("nats-py"),
        "faststream": _version("faststream"),
        "nats_server": _nats_server_version(),
        "cpus": os.cpu_count(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _rounds(count: int) -> str:
    return "" if count <= 1 else f" in {count} rounds (median round reported)"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _nats_server_version() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            [find_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        # "nats-server: v2.x.y"
        return out.strip().rsplit(" ", 1)[-1]
    return "?"


def _progress(line: str) -> None:
    print(f"[bench] {line}", flush=True)


def _quiet(line: str) -> None:
    pass
