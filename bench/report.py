"""What a run found: results, ratios against the baselines, targets, as a table and as JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.cpu import ceiling_calls_per_s, resolution_us
from bench.stats import LatencySummary, ThroughputSummary, format_number, format_ratio, ratio
from bench.study import Findings
from bench.targets import TARGET_SCENARIO, TargetCheck, check_targets

COMPARISONS: tuple[tuple[str, str], ...] = (("o1", "b1"), ("o1", "b2"), ("o2", "b1"), ("o2", "b3"))
"""(ours, baseline) pairs the report states ratios for."""


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    title: str
    what: str
    latency: LatencySummary | None = None
    throughput: ThroughputSummary | None = None
    error: str | None = None
    wall_seconds: float = 0.0
    """Setup, both phases and teardown."""
    cpu_us_c1: dict[str, float] = field(default_factory=dict)
    """Microseconds of CPU per call, per process, in the c=1 phase."""
    cpu_us_c32: dict[str, float] = field(default_factory=dict)
    findings: Findings | None = None
    """What a study (`bench.study`) found beyond the two phases of a call."""

    @property
    def p50_ms(self) -> float | None:
        return None if self.latency is None else self.latency.p50_ms

    @property
    def calls_per_s(self) -> float | None:
        return None if self.throughput is None else self.throughput.calls_per_s


@dataclass(frozen=True)
class Comparison:
    ours: str
    baseline: str
    p50_ratio: float | None
    """ours / baseline: above 1 means slower than the baseline."""
    throughput_ratio: float | None
    """ours / baseline: below 1 means fewer calls per second than the baseline."""


@dataclass(frozen=True)
class RunReport:
    meta: dict[str, Any]
    results: list[ScenarioResult]
    comparisons: list[Comparison] = field(default_factory=list)
    targets: list[TargetCheck] = field(default_factory=list)

    @property
    def failed(self) -> list[ScenarioResult]:
        return [r for r in self.results if r.error is not None]


def compare(results: Sequence[ScenarioResult]) -> list[Comparison]:
    """The ratios of COMPARISONS whose two scenarios both ran (a failed one gives n/a)."""
    by_name = {r.name: r for r in results}
    found: list[Comparison] = []
    for ours, base in COMPARISONS:
        if ours not in by_name or base not in by_name:
            continue
        o, b = by_name[ours], by_name[base]
        found.append(
            Comparison(
                ours=ours,
                baseline=base,
                p50_ratio=ratio(o.p50_ms, b.p50_ms),
                throughput_ratio=ratio(o.calls_per_s, b.calls_per_s),
            )
        )
    return found


def build_report(meta: dict[str, Any], results: list[ScenarioResult]) -> RunReport:
    target = next((r for r in results if r.name == TARGET_SCENARIO), None)
    checks = [] if target is None else check_targets(target.p50_ms, target.calls_per_s)
    return RunReport(meta=meta, results=results, comparisons=compare(results), targets=checks)


def render(report: RunReport) -> str:
    meta = report.meta
    lines = [
        "gpuproxy bench: command round trips, ratios against baselines measured in this run",
        f"  event loop  : uvloop {meta.get('uvloop', '?')} for every scenario "
        "(bench process, gRPC echo server, gateway and worker)",
        f"  python      : {meta.get('python', '?')}; nats-server {meta.get('nats_server', '?')}; "
        f"grpcio {meta.get('grpcio', '?')}; nats-py {meta.get('nats_py', '?')}; "
        f"faststream {meta.get('faststream', '?')}",
        f"  machine     : {meta.get('cpus', '?')} CPUs, loopback only; "
        f"mode {meta.get('mode', '?')}",
        f"  plan        : {meta.get('plan_text', '?')}",
        "",
    ]
    lines += _table(report.results, report.targets)
    lines.append("")
    lines += _what(report.results)
    lines += _cpu(report.results, int(meta.get("cpus") or 0), meta.get("plan", {}))
    if report.comparisons:
        lines += [
            "",
            "Ratios (ours / baseline; p50: below 1.00x is faster, calls/s: above 1.00x is more)",
        ]
        for c in report.comparisons:
            lines.append(
                f"  {c.ours.upper()} vs {c.baseline.upper()}:  p50 {format_ratio(c.p50_ratio):>7}"
                f"   calls/s {format_ratio(c.throughput_ratio):>7}"
            )
    if report.targets:
        lines += ["", f"Targets from the issue, for {TARGET_SCENARIO.upper()} in this run:"]
        for t in report.targets:
            unit = "ms" if "p50" in t.what else "calls/s"
            digits = 2 if unit == "ms" else 0
            lines.append(
                f"  {t.what:<19} {t.goal:<20} measured {format_number(t.measured, digits):>8} "
                f"{unit:<7}  {t.verdict}"
            )
    found = _findings(report.results)
    for findings in found.values():
        text = findings.lines(found)
        if text:
            lines += ["", *text]
    for r in report.failed:
        lines += ["", f"{r.name.upper()} FAILED: {r.error}"]
    return "\n".join(lines)


def _findings(results: Sequence[ScenarioResult]) -> dict[str, Findings]:
    return {r.name: r.findings for r in results if r.findings is not None}


def _table(results: Sequence[ScenarioResult], targets: Sequence[TargetCheck]) -> list[str]:
    header = (
        f"{'scenario':<26} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7}   {'calls/s':>7} "
        f"{'rounds':>14} {'p50 ms':>7}   {'wall s':>6}"
    )
    group = f"{'':<26} {'-- c=1, sequential --':^23}   {'-- c=32: median, range of rounds --':^38}"
    out = [group, header, "-" * len(header)]
    for r in results:
        if r.error is not None:
            out.append(f"{r.title:<26} {'FAILED':>7}   {r.wall_seconds:>63.1f}")
            continue
        lat, thr = r.latency, r.throughput
        c1 = ("n/a",) * 3 if lat is None else (lat.p50_ms, lat.p90_ms, lat.p99_ms)
        c32 = ("n/a",) * 2 if thr is None else (thr.calls_per_s, thr.p50_ms)
        spread = "n/a" if thr is None else _range(thr.round_rates)
        row = (
            f"{r.title:<26} {_cell(c1[0]):>7} {_cell(c1[1]):>7} {_cell(c1[2]):>7}   "
            f"{_cell(c32[0], 0):>7} {spread:>14} {_cell(c32[1]):>7}   {r.wall_seconds:>6.1f}"
        )
        if r.name == TARGET_SCENARIO and targets:
            row += "   targets: " + "; ".join(f"{t.goal} {t.verdict}" for t in targets)
        out.append(row)
    return out


def _range(rates: Sequence[float]) -> str:
    if len(rates) < 2:
        return "-"
    return f"{min(rates):,.0f}-{max(rates):,.0f}"


def _cpu(results: Sequence[ScenarioResult], cpus: int, plan: dict[str, int]) -> list[str]:
    measured = [r for r in results if r.cpu_us_c1 or r.cpu_us_c32]
    if not measured:
        return []
    steps = (
        resolution_us(plan.get("latency_calls", 0)),
        resolution_us(plan.get("throughput_calls", 0)),
    )
    out = [
        "",
        "CPU per call, microseconds at c=1 / c=32 (all threads, user+system), by process "
        f"(clock steps {_us(steps[0])} / {_us(steps[1])} us);",
        f"'cap' = {cpus} CPUs / total at c=32: the most calls/s if CPU were the only limit",
    ]
    for r in measured:
        parts = [
            f"{name} {_us(r.cpu_us_c1.get(name))} / {_us(r.cpu_us_c32.get(name))}"
            for name in r.cpu_us_c1.keys() | r.cpu_us_c32.keys()
        ]
        total1, total32 = sum(r.cpu_us_c1.values()), sum(r.cpu_us_c32.values())
        cap = ceiling_calls_per_s(r.cpu_us_c32, cpus)
        out.append(
            f"  {r.name.upper()}: " + ", ".join(sorted(parts)) + f"; total {_us(total1)} / "
            f"{_us(total32)}; cap {format_number(cap, 0)}/s"
        )
    return out


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _cell(value: float | str, digits: int = 2) -> str:
    return value if isinstance(value, str) else format_number(value, digits)


def _what(results: Sequence[ScenarioResult]) -> list[str]:
    return [f"  {r.name.upper()}: {r.what}" for r in results]


def to_json(report: RunReport) -> dict[str, Any]:
    found = _findings(report.results)
    return {
        "meta": report.meta,
        "scenarios": {
            r.name: {
                "title": r.title,
                "what": r.what,
                "ok": r.error is None,
                "error": r.error,
                "wall_seconds": r.wall_seconds,
                "latency_c1": None if r.latency is None else dataclasses.asdict(r.latency),
                "throughput": None if r.throughput is None else dataclasses.asdict(r.throughput),
                "cpu_us_per_call_c1": r.cpu_us_c1,
                "cpu_us_per_call_c32": r.cpu_us_c32,
                "findings": None if r.findings is None else r.findings.to_json(found),
            }
            for r in report.results
        },
        "ratios": [dataclasses.asdict(c) for c in report.comparisons],
        "targets": {
            "scenario": TARGET_SCENARIO,
            "checks": [dataclasses.asdict(t) | {"verdict": t.verdict} for t in report.targets],
        },
    }
