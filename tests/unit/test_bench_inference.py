"""The inference scenarios' studies: how their findings reach the report, and one real run."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.inference import ChatFigures, ChatFindings
from bench.inference_routing import RoutingFindings, StrategyFigures, Workload
from bench.measure import QUICK_PLAN, Plan, Session
from bench.report import build_report, render, to_json
from bench.runner import run_scenario
from bench.scenarios import Scenario
from bench.study import Measured, Say, Study

REPO_ROOT = Path(__file__).resolve().parents[2]


def chat(
    streamed: bool, concurrency: int, rate: float, p50: float, ttft: float | None = None
) -> ChatFigures:
    return ChatFigures(
        streamed=streamed,
        concurrency=concurrency,
        requests_per_s=rate,
        p50_ms=p50,
        p99_ms=p50 * 2,
        ttft_p50_ms=ttft,
        ttft_p99_ms=None if ttft is None else ttft * 2,
        cpu_us={},
    )


DIRECT = ChatFindings(
    "i0", "I0 direct", (chat(False, 1, 1000.0, 1.0), chat(True, 32, 400.0, 50.0, 40.0))
)
GATEWAY = ChatFindings(
    "i1",
    "I1 gateway",
    (chat(False, 1, 250.0, 4.0), chat(True, 32, 100.0, 200.0, 150.0)),
    baseline="i0",
)


def routed(system_prompt: str, strategy: str, p50: float, cached: int) -> StrategyFigures:
    return StrategyFigures(
        system_prompt=system_prompt,
        strategy=strategy,
        requests=64,
        ttft_p50_ms=p50,
        ttft_p99_ms=p50 * 2,
        ttft_mean_ms=p50,
        prompt_tokens=1000,
        cached_tokens=cached,
        per_machine=(16, 16, 16, 16),
        seconds=1.0,
    )


def test_gateway_findings_show_the_baseline_beside_them_with_ratio_and_ms_added() -> None:
    found = {"i0": DIRECT, "i1": GATEWAY}
    assert DIRECT.lines(found) == []  # printed in I1's table, not twice
    text = "\n".join(GATEWAY.lines(found))
    assert "I1 gateway against I0 direct" in text
    added = [line.split() for line in text.splitlines() if line.strip().startswith("added")]
    assert added[0] == ["added", "0.25x", "+3.00", "+6.00", "-", "-"]
    assert added[1] == ["added", "0.25x", "+150.00", "+300.00", "+110.00", "+220.00"]


def test_gateway_findings_alone_show_their_own_figures_and_no_comparison() -> None:
    alone = {"i1": GATEWAY}
    text = "\n".join(GATEWAY.lines(alone))
    assert "no baseline in this run" in text
    assert "added" not in text
    assert GATEWAY.to_json(alone)["added"] is None


def test_gateway_findings_json_carries_the_differences_by_mode_and_concurrency() -> None:
    data = GATEWAY.to_json({"i0": DIRECT, "i1": GATEWAY})
    assert data["against"] == "i0"
    sse = next(a for a in data["added"] if a["mode"] == "sse")
    assert sse["concurrency"] == 32
    assert sse["requests_per_s_ratio"] == pytest.approx(0.25)
    assert sse["ttft_p50_added_ms"] == pytest.approx(110.0)
    json.dumps(data)  # plain JSON types only


def test_routing_ratios_are_against_round_robin_on_the_same_system_prompts() -> None:
    findings = RoutingFindings(
        Workload(conversations=16, turns=4, rounds=1),
        (
            routed("own", "round_robin", 100.0, 300),
            routed("own", "cache_aware", 50.0, 700),
            routed("shared", "round_robin", 80.0, 500),
            routed("shared", "cache_aware", 120.0, 800),
        ),
    )
    runs = {(r["system_prompt"], r["strategy"]): r for r in findings.to_json({})["runs"]}
    assert runs["own", "cache_aware"]["ttft_p50_ratio"] == pytest.approx(0.5)
    assert runs["shared", "cache_aware"]["ttft_p50_ratio"] == pytest.approx(1.5)
    assert runs["own", "cache_aware"]["cached_share"] == pytest.approx(0.7)
    row = next(line for line in findings.lines({}) if line.startswith("own            cache"))
    assert row.split()[2:6] == ["50.0", "100.0", "0.50x", "0.50x"]


async def test_a_study_is_measured_by_itself_and_its_findings_reach_the_report() -> None:
    @contextlib.asynccontextmanager
    async def study(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
        async def measure(say: Say) -> Measured:
            say("measuring")
            return Measured(findings=DIRECT)

        yield Study(measure=measure)

    found = await run_scenario(Scenario("i0", "I0 x", "a study", study), QUICK_PLAN)
    assert found.error is None
    assert found.latency is None
    report = build_report({}, [found])
    assert "I0 direct: OpenAI chat" in render(report)
    assert to_json(report)["scenarios"]["i0"]["findings"]["label"] == "I0 direct"


async def test_a_study_that_breaks_is_reported_failed() -> None:
    @contextlib.asynccontextmanager
    async def study(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
        async def measure(say: Say) -> Measured:
            raise RuntimeError("machine gone")

        yield Study(measure=measure)

    found = await run_scenario(Scenario("i9", "I9", "breaks", study), QUICK_PLAN, progress=False)
    assert found.error == "RuntimeError: machine gone"


@pytest.mark.timeout(90)
def test_quick_run_of_the_direct_chat_reports_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "i0", "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    i0 = json.loads(out.read_text())["scenarios"]["i0"]
    assert i0["ok"] is True
    assert i0["latency_c1"]["calls"] == 50
    assert i0["throughput"]["calls"] == 320
    figures = {(f["mode"], f["concurrency"]): f for f in i0["findings"]["figures"]}
    assert set(figures) == {("whole", 1), ("whole", 32), ("sse", 1), ("sse", 32)}
    assert figures["whole", 1]["ttft_p50_ms"] is None
    assert 0 < figures["sse", 32]["ttft_p50_ms"] <= figures["sse", 32]["p99_ms"]
