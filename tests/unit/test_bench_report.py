"""The benchmark's arithmetic and report, and one real quick run of the in-process bus."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.measure import QUICK_PLAN, Plan, Session, WrongAnswer, expect
from bench.report import ScenarioResult, build_report, compare, render
from bench.runner import run_scenario
from bench.scenarios import Scenario, select
from bench.stats import (
    LatencySummary,
    ThroughputSummary,
    format_ratio,
    percentile,
    ratio,
    summarize_latency,
    summarize_throughput,
)
from bench.targets import check_targets

REPO_ROOT = Path(__file__).resolve().parents[2]


def result(name: str, p50_ms: float, calls_per_s: float) -> ScenarioResult:
    return ScenarioResult(
        name=name,
        title=name.upper(),
        what="",
        latency=LatencySummary(
            calls=1,
            p50_ms=p50_ms,
            p90_ms=p50_ms,
            p99_ms=p50_ms,
            mean_ms=p50_ms,
            min_ms=p50_ms,
            max_ms=p50_ms,
        ),
        throughput=ThroughputSummary(
            calls=1,
            concurrency=32,
            seconds=1.0,
            calls_per_s=calls_per_s,
            round_rates=(calls_per_s,),
            p50_ms=1.0,
            p99_ms=1.0,
        ),
    )


def test_percentile_interpolates_between_closest_ranks_like_numpy() -> None:
    samples = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 50) == pytest.approx(2.5)
    assert percentile(samples, 90) == pytest.approx(3.7)
    assert percentile(samples, 100) == 4.0


def test_percentile_of_one_sample_is_that_sample() -> None:
    assert percentile([7.0], 99) == 7.0


def test_percentile_refuses_no_samples_and_out_of_range_ranks() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


def test_latency_summary_is_in_milliseconds() -> None:
    summary = summarize_latency([0.001] * 98 + [0.002, 0.010])
    assert summary.calls == 100
    assert summary.p50_ms == pytest.approx(1.0)
    assert summary.max_ms == pytest.approx(10.0)


def test_throughput_is_the_median_round_rate_of_calls_over_wall_time() -> None:
    rounds = [(1500, 1.0), (1500, 0.5), (1500, 3.0)]  # 1500, 3000 and 500 calls/s
    summary = summarize_throughput(rounds, [0.01] * 4500, concurrency=32)
    assert summary.calls_per_s == pytest.approx(1500.0)
    assert summary.round_rates == pytest.approx((1500.0, 3000.0, 500.0))
    assert summary.calls == 4500
    assert summary.seconds == pytest.approx(4.5)


def test_throughput_refuses_rounds_that_took_no_time() -> None:
    with pytest.raises(ValueError, match="some time"):
        summarize_throughput([(10, 0.0)], [0.01], concurrency=32)
    with pytest.raises(ValueError, match="no throughput rounds"):
        summarize_throughput([], [], concurrency=32)


def test_ratio_is_ours_over_baseline_and_missing_when_a_side_is() -> None:
    assert ratio(3.0, 2.0) == pytest.approx(1.5)
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def test_ratio_is_formatted_with_two_decimals_and_an_x() -> None:
    assert format_ratio(1.5) == "1.50x"
    assert format_ratio(0.123) == "0.12x"
    assert format_ratio(None) == "n/a"


def test_targets_are_met_on_their_boundaries() -> None:
    p50, rate = check_targets(2.5, 2000.0)
    assert (p50.met, rate.met) == (True, True)
    assert (p50.verdict, rate.verdict) == ("MET", "MET")


def test_targets_are_missed_just_past_their_boundaries() -> None:
    p50, rate = check_targets(2.51, 1999.0)
    assert (p50.verdict, rate.verdict) == ("MISSED", "MISSED")


def test_targets_of_a_failed_run_are_neither_met_nor_missed() -> None:
    assert [t.verdict for t in check_targets(None, None)] == ["NOT MEASURED"] * 2


def test_comparisons_cover_the_pairs_that_ran_and_give_na_for_a_failed_side() -> None:
    results = [
        result("b1", 1.0, 4000.0),
        ScenarioResult(name="b3", title="B3", what="", error="WrongAnswer: boom"),
        result("o1", 1.5, 2000.0),
        result("o2", 2.0, 1000.0),
    ]
    found = {(c.ours, c.baseline): c for c in compare(results)}
    assert set(found) == {("o1", "b1"), ("o2", "b1"), ("o2", "b3")}  # no b2 in this run
    assert found["o1", "b1"].p50_ratio == pytest.approx(1.5)
    assert found["o1", "b1"].throughput_ratio == pytest.approx(0.5)
    assert found["o2", "b3"].p50_ratio is None


def test_report_shows_ratios_targets_and_failures() -> None:
    results = [
        result("b1", 1.0, 4000.0),
        result("o2", 3.0, 2500.0),
        ScenarioResult(name="b3", title="B3", what="", error="WrongAnswer: echo mismatch"),
    ]
    text = render(build_report({"uvloop": "0.23.0"}, results))
    assert "uvloop 0.23.0" in text
    assert "O2 vs B1:  p50   3.00x   calls/s   0.62x" in text
    lines = text.splitlines()
    assert next(line for line in lines if "p50 at c=1" in line).endswith("MISSED")
    assert next(line for line in lines if "throughput at c=32" in line).endswith("MET")
    assert "B3 FAILED: WrongAnswer: echo mismatch" in text


def test_a_wrong_answer_is_an_error_not_a_number() -> None:
    expect("bench-1", "bench-1")
    with pytest.raises(WrongAnswer, match="bench-2"):
        expect("bench-1", "bench-2")


async def test_a_path_that_answers_wrongly_is_reported_failed_with_no_numbers() -> None:
    @contextlib.asynccontextmanager
    async def broken(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
        async def call(n: int) -> None:
            expect(f"bench-{n}", "bench-fast-but-wrong")

        yield Session(call)

    scenario = Scenario("x1", "X1 broken", "answers with the wrong payload", broken)
    found = await run_scenario(scenario, QUICK_PLAN, progress=False)
    assert found.latency is None
    assert found.throughput is None
    assert found.error is not None
    assert found.error.startswith("WrongAnswer: echo mismatch")


async def test_a_path_that_breaks_under_load_names_the_cause_not_the_task_group() -> None:
    @contextlib.asynccontextmanager
    async def breaks_under_load(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
        async def call(n: int) -> None:
            if n > plan.warmup + plan.latency_calls + 5:
                expect(f"bench-{n}", "late")

        yield Session(call)

    scenario = Scenario("x2", "X2 fragile", "fails only at c=32", breaks_under_load)
    found = await run_scenario(scenario, QUICK_PLAN, progress=False)
    assert found.error is not None
    assert found.error.startswith("WrongAnswer: echo mismatch")


def test_only_selects_named_scenarios_in_run_order_and_refuses_unknown_ones() -> None:
    assert [s.name for s in select("O1,b1")] == ["b1", "o1"]
    assert len(select(None)) == 9
    with pytest.raises(ValueError, match="unknown scenario x9"):
        select("b1,x9")


@pytest.mark.timeout(60)
def test_quick_run_of_the_bus_reports_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "o1", "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "O1 gpuproxy bus" in done.stdout
    report = json.loads(out.read_text())
    o1 = report["scenarios"]["o1"]
    assert o1["ok"] is True
    assert o1["latency_c1"]["calls"] == 50
    assert 0 < o1["latency_c1"]["p50_ms"] < 1000
    assert o1["throughput"]["calls"] == 320
    assert o1["throughput"]["calls_per_s"] > 0
