"""CPU time each process of a scenario spends per call: where the time goes.

Read from /proc (all threads of a process, user and system), so it includes the threads
of grpc and nats-server. Elsewhere than Linux the figures are simply missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds the process has used so far, or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name, in parentheses, may itself contain spaces: count from its end.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def resolution_us(calls: int) -> float | None:
    """How coarse a per-call figure is: one clock tick of /proc spread over `calls`."""
    return None if calls <= 0 else 1e6 / _TICKS / calls


def snapshot(processes: Mapping[str, int]) -> dict[str, float | None]:
    return {name: cpu_seconds(pid) for name, pid in processes.items()}


def per_call_us(
    before: Mapping[str, float | None], after: Mapping[str, float | None], calls: int
) -> dict[str, float]:
    """Microseconds of CPU per call for each process readable at both ends."""
    if calls <= 0:
        return {}
    found: dict[str, float] = {}
    for name, start in before.items():
        end = after.get(name)
        if start is not None and end is not None:
            found[name] = (end - start) / calls * 1e6
    return found


def ceiling_calls_per_s(us_per_call: Mapping[str, float], cpus: int) -> float | None:
    """The most calls per second `cpus` could carry if CPU were the only limit."""
    total = sum(us_per_call.values())
    if total <= 0 or cpus <= 0:
        return None
    return cpus * 1e6 / total
