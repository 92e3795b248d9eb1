"""The peer comparison (P1 against I1 over I0), the open-streams findings, and how the
on-request scenarios are selected."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.inference import ChatFindings
from bench.litellm_venv import REQUIREMENT, ensure_litellm, installed
from bench.measure import DEFAULT_PLAN, QUICK_PLAN
from bench.open_streams import Memory, StreamsFindings, resident_mb
from bench.peers import PeerFindings, litellm_config, litellm_env, peer_plan, versus
from bench.scenarios import select
from simulator.upstream import DEFAULT_MODEL
from tests.unit.test_bench_inference import chat

DIRECT = ChatFindings(
    "i0", "I0 direct", (chat(False, 1, 1000.0, 1.0), chat(True, 32, 800.0, 40.0, 30.0))
)
GATEWAY = ChatFindings(
    "i1",
    "I1 gateway",
    (chat(False, 1, 300.0, 2.0), chat(True, 32, 240.0, 140.0, 80.0)),
    baseline="i0",
)
LITELLM = PeerFindings(
    "p1",
    "P1 LiteLLM",
    (chat(False, 1, 40.0, 11.0), chat(True, 32, 60.0, 540.0, 330.0)),
    baseline="i0",
    ours="i1",
    latency_calls=300,
    throughput_calls=960,
)
FOUND = {"i0": DIRECT, "i1": GATEWAY, "p1": LITELLM}


def test_each_path_is_judged_by_what_it_adds_to_the_direct_path() -> None:
    rows = {(r.mode, r.concurrency, r.figure): r for r in versus(GATEWAY, LITELLM, DIRECT)}
    whole = rows["whole", 1, "p50 added ms"]
    assert (whole.ours, whole.peer) == (pytest.approx(1.0), pytest.approx(10.0))
    assert whole.ratio == pytest.approx(0.1)
    assert whole.met is True  # 1 ms is at most a fifth of 10 ms
    sse = rows["sse", 32, "p50 added ms"]
    assert (sse.ours, sse.peer) == (pytest.approx(100.0), pytest.approx(500.0))
    assert sse.met is True  # exactly a fifth
    ttft = rows["sse", 32, "TTFT p50 added ms"]
    assert (ttft.ours, ttft.peer, ttft.met) == (pytest.approx(50.0), pytest.approx(300.0), True)
    assert rows["whole", 1, "p99 added ms"].met is True  # every latency figure is judged
    assert rows["sse", 32, "req/s"].ratio == pytest.approx(4.0)
    assert rows["sse", 32, "req/s"].met is True
    assert rows["whole", 1, "req/s"].met is None  # the throughput goal is for c=32 only


def test_a_path_adding_more_than_a_fifth_of_the_peer_misses_the_goal() -> None:
    slower = ChatFindings("i1", "I1 gateway", (chat(False, 1, 300.0, 4.0),), baseline="i0")
    row = next(r for r in versus(slower, LITELLM, DIRECT) if r.figure == "p50 added ms")
    assert row.met is False


def test_a_peer_adding_nothing_gives_no_ratio_but_still_a_verdict() -> None:
    free = PeerFindings("p1", "P1", (chat(False, 1, 1000.0, 1.0),), baseline="i0")
    row = next(r for r in versus(GATEWAY, free, DIRECT) if r.figure == "p50 added ms")
    assert row.ratio is None
    assert row.met is False


def test_peer_findings_show_the_direct_path_and_then_gpuproxy_beside_the_peer() -> None:
    text = "\n".join(LITELLM.lines(FOUND))
    assert "P1 LiteLLM against I0 direct" in text
    assert "I1 gateway against P1 LiteLLM" in text
    row = next(line for line in text.splitlines() if "whole" in line and "p50 added" in line)
    assert row.split()[5:] == ["+1.00", "+10.00", "0.10x", "<=", "0.20x", "MET"]
    data = LITELLM.to_json(FOUND)
    assert data["versus"]["scenario"] == "i1"
    assert data["peer"]["latency_calls"] == 300
    json.dumps(data)  # plain JSON types only


def test_peer_findings_without_gpuproxy_in_the_run_show_no_comparison() -> None:
    alone = {"i0": DIRECT, "p1": LITELLM}
    assert "against P1" not in "\n".join(LITELLM.lines(alone))
    assert LITELLM.to_json(alone)["versus"] is None


def test_the_peer_is_measured_with_fewer_calls_than_a_full_run_but_never_more() -> None:
    plan = peer_plan(DEFAULT_PLAN)
    assert (plan.warmup, plan.latency_calls, plan.throughput_calls) == (50, 300, 960)
    assert plan.phase_timeout >= DEFAULT_PLAN.phase_timeout
    quick = peer_plan(QUICK_PLAN)
    assert quick.latency_calls == QUICK_PLAN.latency_calls
    assert quick.throughput_calls == QUICK_PLAN.throughput_calls


def test_litellm_points_its_one_model_at_the_machine() -> None:
    config = litellm_config("http://127.0.0.1:9999")
    (model,) = config["model_list"]
    assert model["model_name"] == DEFAULT_MODEL
    assert model["litellm_params"]["model"] == f"openai/{DEFAULT_MODEL}"
    assert model["litellm_params"]["api_base"] == "http://127.0.0.1:9999/v1"


def test_litellm_never_sees_gpuproxys_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://gpuproxy@db/gpuproxy")
    env = litellm_env("sk-bench")
    assert "DATABASE_URL" not in env
    assert env["LITELLM_MASTER_KEY"] == "sk-bench"
    assert env["LITELLM_LOG"] == "ERROR"


async def test_an_installed_venv_is_reused_without_pip(tmp_path: Path) -> None:
    venv = tmp_path / "litellm-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "litellm").write_text("#!/bin/sh\n")
    (venv / "gpuproxy-bench-requirement.txt").write_text(REQUIREMENT + "\n")
    said: list[str] = []
    assert installed(venv)
    assert await ensure_litellm(said.append, venv) == venv / "bin" / "litellm"
    assert said == []


def test_a_venv_made_for_another_pin_is_not_taken_for_installed(tmp_path: Path) -> None:
    (tmp_path / "gpuproxy-bench-requirement.txt").write_text("litellm[proxy]==0.1\n")
    assert not installed(tmp_path)
    assert not installed(tmp_path / "absent")


def streams(count: int, gateway_open_mb: float) -> StreamsFindings:
    return StreamsFindings(
        streams=count,
        instances=42,
        window=1100,
        first_chunks_s=4.0,
        first_chunk_p50_ms=2000.0,
        first_chunk_p99_ms=3900.0,
        open_when_read=count,
        memory=(
            Memory("gateway", idle_mb=100.0, open_mb=gateway_open_mb, peak_mb=gateway_open_mb),
            Memory("proxy", idle_mb=70.0, open_mb=95.0, peak_mb=95.0),
        ),
        completed_s=34.0,
    )


def test_open_streams_meet_the_target_at_a_thousand_streams_under_400_mb() -> None:
    found = streams(1000, 300.0)
    assert found.target_met is True
    assert found.gateway.per_stream_kb(1000) == pytest.approx(204.8)
    assert found.lines({})[-1].endswith("MET")
    assert streams(1000, 401.0).target_met is False


def test_fewer_streams_than_the_target_leave_it_unjudged() -> None:
    found = streams(200, 120.0)
    assert found.target_met is None
    assert "NOT MEASURED (200 streams)" in found.lines({})[-1]
    data = found.to_json({})
    assert data["memory"][0]["name"] == "gateway"
    json.dumps(data)


def test_resident_memory_is_read_from_proc() -> None:
    rss, peak = resident_mb(os.getpid())
    assert 0 < rss <= peak


def test_on_request_scenarios_run_only_when_named_or_with_peers() -> None:
    default = [s.name for s in select(None)]
    assert "p1" not in default
    assert "i3" in default  # 1,000 open streams: part of every full run
    assert [s.name for s in select("i3")] == ["i3"]
    assert [s.name for s in select("b1", peers=True)] == ["b1", "i0", "i1", "p1"]
    assert [s.name for s in select(None, peers=True)] == [*default[:7], "p1", *default[7:]]
