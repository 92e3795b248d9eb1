"""GPUs through both front doors: offers, instances, reservations, catalogue, preferences,
and bad input that changes nothing."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from tests.e2e.access_client import User, grpc_status
from tests.e2e.system import System

pytestmark = pytest.mark.timeout(180)


def bearer(user: User) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {user.token}"),)


async def mine(user: User, **params: Any) -> list[dict[str, Any]]:
    answer = await user.call("GET", "/api/v1/gpu/instances/mine", params=params)
    assert answer.status_code == 200, answer.text
    instances: list[dict[str, Any]] = answer.json()["instances"]
    return instances


async def test_offers_apply_every_filter_on_both_doors(
    system: System, http: httpx.AsyncClient
) -> None:
    user = await User.signed_up(http, system)
    answer = await user.call(
        "GET",
        "/api/v1/gpu/instances",
        params={"provider": "sim", "min_vram": "40", "max_price": "3.5", "location": "EU"},
    )
    assert answer.status_code == 200, answer.text
    offers = answer.json()["instances"]
    assert offers
    for offer in offers:
        assert offer["vram_gb"] >= 40
        assert offer["price_per_hour_micros"] <= 3_500_000
        assert offer["location"].startswith("EU")
        assert offer["kind"] == "offer"
    prices = [o["price_per_hour_micros"] for o in offers]
    assert prices == sorted(prices)

    async with grpc.aio.insecure_channel(system.grpc_target) as channel:
        listed = await pb_grpc.GPUProxyServiceStub(channel).ListGPUInstances(
            pb.ListGPUInstancesRequest(provider="sim", min_vram=40, max_price=3.5, location="EU"),
            metadata=bearer(user),
            timeout=30,
        )
    assert [o.id for o in listed.instances] == [o["id"] for o in offers]
    assert listed.total_count == len(offers)

    model = offers[0]["gpu_model"]
    by_model = await user.call("GET", "/api/v1/gpu/instances", params={"gpu_model": model})
    assert {o["gpu_model"] for o in by_model.json()["instances"]} == {model}


async def test_a_max_price_with_more_than_six_decimals_is_rounded_down_not_refused(
    system: System, http: httpx.AsyncClient
) -> None:
    user = await User.signed_up(http, system)
    computed = 0.1 * 3 + 2  # 2.3000000000000003, as a client's arithmetic makes it
    async with grpc.aio.insecure_channel(system.grpc_target) as channel:
        listed = await pb_grpc.GPUProxyServiceStub(channel).ListGPUInstances(
            pb.ListGPUInstancesRequest(provider="sim", max_price=computed),
            metadata=bearer(user),
            timeout=30,
        )
    assert listed.instances
    assert all(o.price_per_hour_micros <= 2_300_000 for o in listed.instances)

    answer = await user.call(
        "GET", "/api/v1/gpu/instances", params={"provider": "sim", "max_price": repr(computed)}
    )
    assert answer.status_code == 200, answer.text
    assert [o["id"] for o in answer.json()["instances"]] == [o.id for o in listed.instances]
    exact = await user.call(
        "GET", "/api/v1/gpu/instances", params={"provider": "sim", "max_price": "2.3"}
    )
    assert [o["id"] for o in exact.json()["instances"]] == [o.id for o in listed.instances]

    below_a_micro = await user.call(
        "GET", "/api/v1/gpu/instances", params={"max_price": "0.0000001"}
    )
    assert below_a_micro.status_code == 400
    assert below_a_micro.json()["error"]["field"] == "max_price"


async def test_a_reservation_over_http_serves_openai_requests_and_is_released(
    system: System, http: httpx.AsyncClient
) -> None:
    user = await User.signed_up(http, system)
    answer = await user.call(
        "POST",
        "/api/v1/gpu/instances/reserve",
        json={"count": 2, "filters": {"provider": "sim"}, "lease_seconds": 600},
        headers={**user.session, "Idempotency-Key": "first-reservation"},
    )
    assert answer.status_code == 201, answer.text
    reservation = answer.json()["reservation"]
    assert reservation["state"] == "active"
    assert answer.json()["reserved_count"] == 2
    instance = reservation["instances"][0]
    assert instance["endpoint"] == f"instance://{instance['id']}"
    completion = await user.call(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "sim-llama-3-8b",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
        },
        headers={**user.session, "x-gpuproxy-instance": instance["id"]},
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] == 4

    again = await user.call(
        "POST",
        "/api/v1/gpu/instances/reserve",
        json={"count": 2, "filters": {"provider": "sim"}, "lease_seconds": 600},
        headers={**user.session, "Idempotency-Key": "first-reservation"},
    )
    assert again.json()["reservation"]["id"] == reservation["id"]
    assert len(await mine(user)) == 2

    listed = await user.call("GET", "/api/v1/gpu/reservations")
    assert [r["id"] for r in listed.json()["reservations"]] == [reservation["id"]]
    # The list carries each reservation's instances as the single route does.
    single = (await user.call("GET", f"/api/v1/gpu/reservations/{reservation['id']}")).json()
    in_list = listed.json()["reservations"][0]
    assert [i["id"] for i in in_list["instances"]] == in_list["instance_ids"]
    assert in_list["instances"] == single["reservation"]["instances"]
    async with grpc.aio.insecure_channel(system.grpc_target) as channel:
        over_grpc = await pb_grpc.GPUProxyServiceStub(channel).ListReservations(
            pb.ListReservationsRequest(), metadata=bearer(user), timeout=30
        )
    assert [i.id for i in over_grpc.reservations[0].instances] == in_list["instance_ids"]
    assert {i.status for i in over_grpc.reservations[0].instances} == {"running"}
    renewed = await user.call(
        "POST", f"/api/v1/gpu/reservations/{reservation['id']}/renew", json={"lease_seconds": 900}
    )
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["reservation"]["lease_seconds"] == 900

    stranger = await User.signed_up(http, system)
    refused = await stranger.call("POST", f"/api/v1/gpu/reservations/{reservation['id']}/release")
    assert refused.status_code == 403
    assert refused.json()["error"]["field"] == "reservation_id"

    released = await user.call("POST", f"/api/v1/gpu/reservations/{reservation['id']}/release")
    assert released.status_code == 200, released.text
    assert released.json()["reservation"]["state"] == "released"
    assert {i["status"] for i in released.json()["reservation"]["instances"]} == {"terminated"}
    assert await mine(user) == []


async def test_create_get_and_destroy_an_instance_over_grpc(
    system: System, http: httpx.AsyncClient
) -> None:
    user = await User.signed_up(http, system)
    stranger = await User.signed_up(http, system)
    async with grpc.aio.insecure_channel(system.grpc_target) as channel:
        stub = pb_grpc.GPUProxyServiceStub(channel)
        offers = await stub.ListGPUInstances(
            pb.ListGPUInstancesRequest(provider="sim"), metadata=bearer(user), timeout=30
        )
        offer = offers.instances[0]
        made = await stub.CreateGPUInstance(
            pb.CreateGPUInstanceRequest(
                provider="sim", instance_id=offer.id, env={"SIM_MODEL": "m"}, ports=[8000]
            ),
            metadata=bearer(user),
            timeout=30,
        )
        assert made.status == "starting"
        assert made.instance.offer_id == offer.id
        found = await stub.GetGPUInstance(
            pb.GetGPUInstanceRequest(provider="sim", instance_id=made.instance_id),
            metadata=bearer(user),
            timeout=30,
        )
        assert found.instance.kind == "instance"
        assert found.instance.owner == user.user_id
        as_offer = await stub.GetGPUInstance(
            pb.GetGPUInstanceRequest(provider="sim", instance_id=offer.id),
            metadata=bearer(user),
            timeout=30,
        )
        assert as_offer.instance.kind == "offer"

        code, details, _ = await grpc_status(
            system,
            "DestroyGPUInstance",
            pb.DestroyGPUInstanceRequest(provider="sim", instance_id=made.instance_id),
            bearer(stranger),
        )
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert details.startswith("instance_id:")

        owned = await stub.ListOwnedGPUInstances(
            pb.ListOwnedGPUInstancesRequest(), metadata=bearer(user), timeout=30
        )
        assert [i.id for i in owned.instances] == [made.instance_id]

        gone = await stub.DestroyGPUInstance(
            pb.DestroyGPUInstanceRequest(provider="sim", instance_id=made.instance_id),
            metadata=bearer(user),
            timeout=30,
        )
        assert gone.success
        assert gone.instance.status == "terminated"


async def test_batch_creates_instances_per_provider(
    system: System, http: httpx.AsyncClient
) -> None:
    user = await User.signed_up(http, system)
    answer = await user.call(
        "POST",
        "/api/v1/gpu/instances/batch",
        json={"counts": {"sim": 2}, "config": {"env": {"SIM_MODEL": "batch"}}},
    )
    assert answer.status_code == 201, answer.text
    assert len(answer.json()["instances"]) == 2
    assert answer.json()["failures"] == []
    missing = await user.call("POST", "/api/v1/gpu/instances/batch", json={"vastai_count": 1})
    assert missing.status_code == 412
    assert missing.json()["failures"][0]["provider"] == "vastai"
    for instance in answer.json()["instances"]:
        await user.call("DELETE", f"/api/v1/gpu/instances/sim/{instance['id']}")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/gpu/instances/reserve", {"count": 0}, "count"),
        ("/api/v1/gpu/instances/reserve", {"count": 17}, "count"),
        (
            "/api/v1/gpu/instances/reserve",
            {"count": 1, "filters": {"max_price": "-1"}},
            "filters.max_price",
        ),
        (
            "/api/v1/gpu/instances/reserve",
            {"count": 1, "filters": {"provider": "nowhere"}},
            "filters.provider",
        ),
        ("/api/v1/gpu/instances/reserve", {"count": 1, "strategy": "luck"}, "strategy"),
        ("/api/v1/gpu/instances/reserve", {"count": 1, "lease_seconds": -5}, "lease_seconds"),
        (
            "/api/v1/gpu/instances/reserve",
            {"count": 1, "config": {"ports": [70000]}},
            "config.ports",
        ),
        ("/api/v1/gpu/instances/batch", {"counts": {"sim": 17}}, "counts.sim"),
        ("/api/v1/gpu/instances/batch", {}, "counts"),
        ("/api/v1/gpu/instances/nowhere/x1", {}, "provider"),
    ],
)
async def test_bad_input_is_refused_naming_the_field_and_creates_nothing(
    system: System, http: httpx.AsyncClient, path: str, body: dict[str, Any], field: str
) -> None:
    user = await User.signed_up(http, system)
    answer = await user.call("POST", path, json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["field"] == field
    assert await mine(user, include_ended="true") == []


async def test_bad_input_over_grpc_names_the_field(system: System, http: httpx.AsyncClient) -> None:
    user = await User.signed_up(http, system)
    cases = [
        ("ReserveGPUs", pb.ReserveGPUsRequest(count=0), "count"),
        ("ReserveGPUs", pb.ReserveGPUsRequest(count=17), "count"),
        ("ReserveGPUs", pb.ReserveGPUsRequest(count=1, max_price=-0.5), "max_price"),
        ("ReserveGPUs", pb.ReserveGPUsRequest(count=1, provider="moon"), "provider"),
        ("ListGPUInstances", pb.ListGPUInstancesRequest(max_price=-1), "max_price"),
        ("ListGPUInstances", pb.ListGPUInstancesRequest(provider="moon"), "provider"),
        (
            "CreateGPUInstance",
            pb.CreateGPUInstanceRequest(provider="moon", instance_id="x"),
            "provider",
        ),
        ("GetGPUInstance", pb.GetGPUInstanceRequest(provider="sim", instance_id=""), "instance_id"),
    ]
    for method, request, field in cases:
        code, details, _ = await grpc_status(system, method, request, bearer(user))
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, details)
        assert details.startswith(f"{field}:"), (method, details)
    code, details, _ = await grpc_status(
        system,
        "GetGPUInstance",
        pb.GetGPUInstanceRequest(provider="sim", instance_id="no-such-offer"),
        bearer(user),
    )
    assert code is grpc.StatusCode.NOT_FOUND
    code, details, _ = await grpc_status(
        system,
        "CreateGPUInstance",
        pb.CreateGPUInstanceRequest(provider="vastai", instance_id="123"),
        bearer(user),
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert "vastai is not configured" in details
    assert await mine(user, include_ended="true") == []


async def test_catalogue_and_preferences(system: System, http: httpx.AsyncClient) -> None:
    user = await User.signed_up(http, system)
    classified = await user.call(
        "GET", "/api/v1/gpu/classify", params={"name": "NVIDIA A100-SXM4-80GB"}
    )
    assert classified.json()["vendor"] == "nvidia"
    assert classified.json()["vram_gb"] == 80
    groups = await user.call("GET", "/api/v1/gpu/groups")
    assert any(g["tier"] == "enterprise" for g in groups.json()["groups"])
    available = await user.call(
        "GET", "/api/v1/gpu/available", params={"vendor": "nvidia", "tier": "enterprise"}
    )
    assert available.status_code == 200, available.text
    assert {o["tier"] for o in available.json()["instances"]} == {"enterprise"}
    bad_tier = await user.call("GET", "/api/v1/gpu/available", params={"tier": "legendary"})
    assert bad_tier.json()["error"]["field"] == "tier"

    saved = await user.call(
        "POST",
        "/api/v1/gpu/preferences",
        json={"provider": "sim", "min_vram": 80, "lease_seconds": 120},
    )
    assert saved.status_code == 200, saved.text
    read = await user.call("GET", "/api/v1/gpu/preferences")
    assert read.json()["preferences"]["min_vram_gb"] == 80
    reserved = await user.call("POST", "/api/v1/gpu/instances/reserve", json={"count": 1})
    assert reserved.status_code == 201, reserved.text
    reservation = reserved.json()["reservation"]
    assert reservation["lease_seconds"] == 120
    assert reservation["instances"][0]["vram_gb"] >= 80
    await user.call("POST", f"/api/v1/gpu/reservations/{reservation['id']}/release")
    refused = await user.call("POST", "/api/v1/gpu/preferences", json={"max_price": "-2"})
    assert refused.status_code == 400
    assert refused.json()["error"]["field"] == "max_price"
