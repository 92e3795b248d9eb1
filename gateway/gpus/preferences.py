"""Each user's GPU preferences: the defaults a reservation takes for what it leaves out.

Kept in SQL with the account (an account's export includes them). A reservation field the
request sets wins; one it leaves empty takes the preference; what neither sets takes the
system default.
"""

from __future__ import annotations

import time

import msgspec
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from gateway.accounts.tables import GpuPreferenceRow
from gateway.gpus import requests
from schemas.errors import InvalidArgument
from schemas.gpus import LaunchSpec, OfferQuery


class Preferences(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Stored normalised: providers by canonical name, prices in micros."""

    providers: tuple[str, ...] = ()
    min_vram_gb: int = 0
    max_price_micros: int = 0
    gpu_model: str = ""
    location: str = ""
    vendor: str = ""
    tier: str = ""
    strategy: str = ""
    lease_seconds: int = 0
    image: str = ""
    env: dict[str, str] = {}
    ports: tuple[int, ...] = ()
    disk_gb: int = 0


class PreferencesBody(requests.FilterBody, frozen=True, kw_only=True):
    """`POST /api/v1/gpu/preferences`: the whole set, replacing what was there."""

    strategy: str = ""
    lease_seconds: int = 0
    image: str = ""
    env: dict[str, str] = {}
    ports: list[int] = []
    disk_gb: int = 0

    def preferences(self) -> Preferences:
        query = self.checked("")
        spec = requests.spec(image=self.image, env=self.env, ports=self.ports, disk_gb=self.disk_gb)
        if self.lease_seconds < 0:
            raise InvalidArgument("must not be negative", field="lease_seconds")
        return Preferences(
            providers=tuple(str(p) for p in query.providers),
            min_vram_gb=query.min_vram_gb,
            max_price_micros=query.max_price_micros,
            gpu_model=query.gpu_model,
            location=query.location,
            vendor=query.vendor,
            tier=query.tier,
            strategy=requests.strategy(self.strategy),
            lease_seconds=requests.lease_seconds(self.lease_seconds) if self.lease_seconds else 0,
            image=spec.image,
            env=spec.env,
            ports=spec.ports,
            disk_gb=spec.disk_gb,
        )


def with_defaults(
    query: OfferQuery, spec: LaunchSpec, preferences: Preferences
) -> tuple[OfferQuery, LaunchSpec]:
    """The request's filters and launch spec, each empty part taken from the preferences."""
    merged_query = OfferQuery(
        providers=query.providers or tuple(requests.provider(p) for p in preferences.providers),
        min_vram_gb=query.min_vram_gb or preferences.min_vram_gb,
        max_price_micros=query.max_price_micros or preferences.max_price_micros,
        gpu_model=query.gpu_model or preferences.gpu_model,
        location=query.location or preferences.location,
        vendor=query.vendor or preferences.vendor,
        tier=query.tier or preferences.tier,
        min_gpus=query.min_gpus,
        limit=query.limit,
    )
    merged_spec = LaunchSpec(
        image=spec.image or preferences.image,
        env=spec.env or preferences.env,
        ports=spec.ports or preferences.ports,
        disk_gb=spec.disk_gb or preferences.disk_gb,
    )
    return merged_query, merged_spec


class PreferenceStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._postgres = engine.dialect.name == "postgresql"

    async def of(self, user_id: str) -> Preferences:
        async with self._sessions() as session:
            row = await session.get(GpuPreferenceRow, user_id)
        if row is None:
            return Preferences()
        return msgspec.json.decode(row.body, type=Preferences)

    async def put(self, user_id: str, preferences: Preferences) -> Preferences:
        values = {
            "user_id": user_id,
            "body": msgspec.json.encode(preferences).decode(),
            "updated_at_ms": int(time.time() * 1000),
        }
        insert = pg_insert if self._postgres else sqlite_insert
        statement = insert(GpuPreferenceRow).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=[GpuPreferenceRow.user_id],
            set_={"body": values["body"], "updated_at_ms": values["updated_at_ms"]},
        )
        async with self._sessions() as session, session.begin():
            await session.execute(statement)
        return preferences
