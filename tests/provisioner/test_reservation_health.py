"""A reservation follows its instances, and a restart checks machines before it answers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from schemas.commands import GetReservation, Reserve
from schemas.events import ReservationTransitioned
from schemas.gpus import InstanceState, ReservationState
from schemas.replies import ReservationView
from simulator.market import Market
from tests.provisioner.harness import (
    Provisioner,
    events_of,
    eventually,
    new_id,
    running_provisioner,
)

pytestmark = pytest.mark.timeout(120)


def kill_machine(market: Market, provider_id: str) -> None:
    """The machine dies under its instance, as a host that fails or reboots."""
    record = market.machine(provider_id)
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)


async def reservation_in(p: Provisioner, reservation_id: str, state: ReservationState) -> object:
    view = await p.call(
        GetReservation(command_id=new_id(), actor="alice", reservation_id=reservation_id)
    )
    assert isinstance(view, ReservationView)
    return view if view.reservation.state is state else None


async def test_a_reservation_degrades_then_fails_as_its_instances_die(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        command = Reserve(command_id=new_id(), actor="alice", count=2)
        view = await p.call(command)
        assert view.reservation.state is ReservationState.ACTIVE
        reservation_id = view.reservation.id
        first, second = view.instances

        kill_machine(p.market, first.provider_id)
        degraded = await eventually(
            lambda: reservation_in(p, reservation_id, ReservationState.DEGRADED)
        )
        assert isinstance(degraded, ReservationView)
        assert degraded.reservation.reason.startswith("1 of 2 instances ended")
        assert first.id in degraded.reservation.reason
        assert {i.id: i.state for i in degraded.instances} == {
            first.id: InstanceState.FAILED,
            second.id: InstanceState.RUNNING,
        }

        kill_machine(p.market, second.provider_id)
        failed = await eventually(
            lambda: reservation_in(p, reservation_id, ReservationState.FAILED)
        )
        assert isinstance(failed, ReservationView)
        assert failed.reservation.reason.startswith("every instance ended")
        moves = [
            e.to_state
            for e in await events_of(p.nc)
            if isinstance(e, ReservationTransitioned) and e.reservation_id == reservation_id
        ]
        assert moves == ["pending", "active", "degraded", "failed"]


async def test_a_restart_checks_machines_before_it_reports_them_running(
    nats_url: str, tmp_path: Path
) -> None:
    sim = tmp_path / "sim"
    async with running_provisioner(nats_url, sim, keep_machines=True) as p:
        view = await p.call(Reserve(command_id=new_id(), actor="alice", count=1))
        assert view.reservation.state is ReservationState.ACTIVE
        machine = view.instances[0].provider_id
    # While nothing watched, the machine went away (its host ended with the old process).
    kill_machine(p.market, machine)

    # No reconciler round within the test: the check is the restart's own.
    async with running_provisioner(nats_url, sim, reconcile_seconds=60.0) as again:
        seen = await again.call(
            GetReservation(command_id=new_id(), actor="alice", reservation_id=view.reservation.id)
        )
        assert isinstance(seen, ReservationView)
        instance = seen.instances[0]
        assert instance.state is InstanceState.FAILED
        assert instance.reason.startswith("exited at sim")
        assert seen.reservation.state is ReservationState.FAILED
        assert seen.reservation.reason.startswith("every instance ended")
