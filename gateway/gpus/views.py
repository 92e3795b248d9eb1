"""Offers, instances and reservations as HTTP JSON and as protobuf messages.

Money goes out as integer micros (`*_micros`) and as exact decimal text (HTTP) or the
compatibility double (gRPC); no amount is computed with a float.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from gateway.pb import gpuproxy_pb2 as pb
from schemas.gpus import GpuOffer, Instance, Reservation

MICROS = Decimal(1_000_000)


def units(micros: int) -> str:
    """Micro-units as decimal text without trailing zeros: 1250000 -> "1.25"."""
    text = f"{Decimal(micros) / MICROS:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def _double(micros: int) -> float:
    return float(Decimal(micros) / MICROS)


def offer_json(offer: GpuOffer) -> dict[str, Any]:
    return {
        "kind": "offer",
        "id": offer.offer_id,
        "provider": str(offer.provider),
        "status": "available",
        "gpu_model": offer.gpu_model,
        "num_gpus": offer.num_gpus,
        "vram_gb": offer.vram_gb,
        "vendor": offer.vendor,
        "tier": offer.tier,
        "location": offer.location,
        "price_per_hour": units(offer.price_per_hour_micros),
        "price_per_hour_micros": offer.price_per_hour_micros,
        "available": offer.available,
        "metadata": offer.metadata,
    }


def inference_target(instance: Instance) -> str:
    """Where a running instance is reached: at the gateway, never at the machine itself (its
    own address answers only the proxy, with the machine's key)."""
    return f"instance://{instance.id}" if instance.endpoint else ""


def instance_json(instance: Instance) -> dict[str, Any]:
    return {
        "kind": "instance",
        "id": instance.id,
        "provider": str(instance.provider),
        "status": str(instance.state),
        "reason": instance.reason,
        "owner": instance.owner,
        "offer_id": instance.offer_id,
        "provider_instance_id": instance.provider_id,
        "gpu_model": instance.gpu_model,
        "num_gpus": instance.num_gpus,
        "vram_gb": instance.vram_gb,
        "location": instance.location,
        "endpoint": inference_target(instance),
        "shared": instance.shared,
        "price_per_hour": units(instance.price_per_hour_micros),
        "price_per_hour_micros": instance.price_per_hour_micros,
        "reservation_id": instance.reservation_id,
        "image": instance.spec.image,
        "ports": list(instance.spec.ports),
        "created_at_ms": instance.created_at_ms,
        "state_since_ms": instance.state_since_ms,
        "deadline_ms": instance.deadline_ms,
        "billable_from_ms": instance.billable_from_ms,
        "ended_at_ms": instance.ended_at_ms,
    }


def reservation_json(reservation: Reservation, instances: list[Instance]) -> dict[str, Any]:
    return {
        "id": reservation.id,
        "owner": reservation.owner,
        "state": str(reservation.state),
        "reason": reservation.reason,
        "count": reservation.count,
        "strategy": reservation.strategy,
        "instance_ids": list(reservation.instance_ids),
        "instances": [instance_json(i) for i in instances],
        "lease_seconds": reservation.lease_seconds,
        "lease_expires_at_ms": reservation.lease_expires_at_ms,
        "created_at_ms": reservation.created_at_ms,
        "updated_at_ms": reservation.updated_at_ms,
    }


def offer_proto(offer: GpuOffer) -> pb.GPUInstance:
    return pb.GPUInstance(
        id=offer.offer_id,
        provider=str(offer.provider),
        status="available",
        price_per_hour=_double(offer.price_per_hour_micros),
        price_per_hour_micros=offer.price_per_hour_micros,
        vram_gb=offer.vram_gb,
        gpu_model=offer.gpu_model,
        num_gpus=offer.num_gpus,
        location=offer.location,
        metadata=offer.metadata,
        kind="offer",
        offer_id=offer.offer_id,
        vendor=offer.vendor,
        tier=offer.tier,
        available=offer.available,
    )


def instance_proto(instance: Instance) -> pb.GPUInstance:
    return pb.GPUInstance(
        id=instance.id,
        provider=str(instance.provider),
        status=str(instance.state),
        price_per_hour=_double(instance.price_per_hour_micros),
        price_per_hour_micros=instance.price_per_hour_micros,
        vram_gb=instance.vram_gb,
        gpu_model=instance.gpu_model,
        num_gpus=instance.num_gpus,
        location=instance.location,
        kind="instance",
        reason=instance.reason,
        endpoint=inference_target(instance),
        offer_id=instance.offer_id,
        reservation_id=instance.reservation_id,
        created_at=instance.created_at_ms // 1000,
        provider_instance_id=instance.provider_id,
        owner=instance.owner,
    )


def reservation_proto(reservation: Reservation, instances: list[Instance]) -> pb.Reservation:
    return pb.Reservation(
        id=reservation.id,
        owner=reservation.owner,
        state=str(reservation.state),
        reason=reservation.reason,
        count=reservation.count,
        instances=[instance_proto(i) for i in instances],
        lease_seconds=reservation.lease_seconds,
        lease_expires_at=reservation.lease_expires_at_ms // 1000,
        created_at=reservation.created_at_ms // 1000,
        strategy=reservation.strategy,
    )
