"""Per-user address lists: their mode, allowlist, denylist, a what-if check and the log.

Lists live in SQL and are projected with the user's access record, so both front doors
enforce them from memory. Changing them never locks the caller out by accident: switching
to a mode that would refuse the address the change comes from needs `force`.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from bus.events import EventPublisher
from gateway.accounts.projection import Projection, access_of
from gateway.accounts.service import fact
from gateway.accounts.tables import IpAccessLogRow, IpRuleRow, User
from gateway.auth import addresses
from gateway.auth.addresses import Address, Decision
from gateway.auth.principal import Principal
from schemas.access import IpMode
from schemas.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from schemas.events import IpAccessChanged

MAX_ENTRIES_PER_LIST = 1000
LISTS = ("allow", "deny")


class IpConfig(msgspec.Struct, frozen=True, kw_only=True):
    mode: str
    audit_log_enabled: bool


class ConfigChange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    mode: str | None = None
    audit_log_enabled: bool | None = None
    force: bool = False
    """Apply even if the new rules would refuse the address this request comes from."""


class NewEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ip_address: str | None = None
    """One address, e.g. 192.0.2.7; `ip` is accepted for it."""
    ip_range: str | None = None
    """A CIDR, e.g. 10.0.0.0/8; `cidr` is accepted for it. Wins over `ip_address`."""
    ip: str | None = None
    cidr: str | None = None
    description: str = ""
    reason: str = ""
    """The denylist's word for `description`; either is accepted."""
    expires_at: datetime | None = None


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    ip_range: str
    description: str
    created_at_ms: int
    expires_at_ms: int | None


class LogEntry(msgspec.Struct, frozen=True, kw_only=True):
    ip_address: str
    result: str
    """`allowed` or `blocked`."""
    reason: str
    endpoint: str
    at_ms: int


def aliased(
    value: str | None, name: str, alias_value: str | None, alias: str
) -> tuple[str | None, str]:
    """A body field sent under its name or its alias (not both), and the name it came as,
    so an error names what the caller wrote."""
    if value is not None and alias_value is not None:
        raise InvalidArgument(f"send {name} or {alias}, not both", field=alias)
    if alias_value is not None:
        return alias_value, alias
    return value, name


def _entry(row: IpRuleRow) -> Entry:
    return Entry(
        id=row.id,
        ip_range=row.cidr,
        description=row.description,
        created_at_ms=row.created_at_ms,
        expires_at_ms=row.expires_at_ms,
    )


def _mode(value: str) -> IpMode:
    try:
        return IpMode(value)
    except ValueError:
        raise InvalidArgument(
            f"must be one of {', '.join(m.value for m in IpMode)}", field="mode"
        ) from None


class IpAccess:
    def __init__(self, engine: AsyncEngine, projection: Projection, events: EventPublisher) -> None:
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._projection = projection
        self._events = events

    async def config(self, owner: str) -> IpConfig:
        async with self._sessions() as db:
            user = await db.get(User, owner)
        if user is None:
            raise NotFound("no such user", field="user_id")
        return IpConfig(mode=user.ip_mode, audit_log_enabled=user.ip_audit)

    async def set_config(
        self, caller: Principal, owner: str, change: ConfigChange, address: Address
    ) -> IpConfig:
        values: dict[str, Any] = {}
        if change.mode is not None:
            values["ip_mode"] = _mode(change.mode).value
        if change.audit_log_enabled is not None:
            values["ip_audit"] = change.audit_log_enabled
        async with self._sessions.begin() as db:
            now = await access_of(db, owner)
            if now is None:
                raise NotFound("no such user", field="user_id")
            if "ip_mode" in values and owner == caller.user_id and not change.force:
                future = msgspec.structs.replace(now, ip_mode=IpMode(values["ip_mode"]))
                verdict = addresses.decide(future, address, int(time.time() * 1000))
                if not verdict.allowed:
                    raise FailedPrecondition(
                        f"this mode would refuse the address you are calling from "
                        f"({verdict.reason}); add it first, or send force: true",
                        field="mode",
                    )
            if values:
                await db.execute(update(User).where(User.id == owner).values(**values))
            config = IpConfig(
                mode=values.get("ip_mode", now.ip_mode.value),
                audit_log_enabled=values.get("ip_audit", now.ip_audit),
            )
        await self._changed(caller, owner, "config", config.mode)
        return config

    async def entries(self, owner: str, which: str) -> list[Entry]:
        async with self._sessions() as db:
            rows = await db.execute(
                select(IpRuleRow)
                .where(IpRuleRow.user_id == owner, IpRuleRow.list == which)
                .order_by(IpRuleRow.created_at_ms, IpRuleRow.id)
            )
            return [_entry(r) for r in rows.scalars()]

    async def add(self, caller: Principal, owner: str, which: str, new: NewEntry) -> Entry:
        assert which in LISTS
        network, network_field = aliased(new.ip_range, "ip_range", new.cidr, "cidr")
        single, single_field = aliased(new.ip_address, "ip_address", new.ip, "ip")
        if network:
            cidr = addresses.parse_network(network, field=network_field)
        elif single:
            cidr = addresses.parse_network(single, field=single_field)
            if cidr.num_addresses != 1:
                raise InvalidArgument("must be a single address; use ip_range", field=single_field)
        else:
            raise InvalidArgument("send ip_address or ip_range", field="ip_address")
        note = (new.description or new.reason).strip()
        if len(note) > 200:
            raise InvalidArgument("must be at most 200 characters", field="description")
        expires_at_ms: int | None = None
        now = int(time.time() * 1000)
        if new.expires_at is not None:
            moment = new.expires_at
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            expires_at_ms = int(moment.timestamp() * 1000)
            if expires_at_ms <= now:
                raise InvalidArgument("must be in the future", field="expires_at")
        row = IpRuleRow(
            id=uuid.uuid4().hex,
            user_id=owner,
            list=which,
            cidr=str(cidr),
            description=note,
            expires_at_ms=expires_at_ms,
            created_at_ms=now,
        )
        async with self._sessions.begin() as db:
            # Counted under the owner's row lock on PostgreSQL; SQLite serialises writers.
            await db.execute(select(User.id).where(User.id == owner).with_for_update())
            count = (
                await db.execute(
                    select(func.count())
                    .select_from(IpRuleRow)
                    .where(IpRuleRow.user_id == owner, IpRuleRow.list == which)
                )
            ).scalar_one()
            if count >= MAX_ENTRIES_PER_LIST:
                raise InvalidArgument(
                    f"a list holds at most {MAX_ENTRIES_PER_LIST} entries", field="ip_range"
                )
            db.add(row)
            try:
                await db.flush()
            except IntegrityError:
                raise AlreadyExists(f"{cidr} is already on this list", field="ip_range") from None
        entry = _entry(row)
        await self._changed(caller, owner, f"{which}list.added", entry_id=row.id, cidr=row.cidr)
        return entry

    async def remove(self, caller: Principal, which: str, entry_id: str) -> None:
        async with self._sessions.begin() as db:
            row = await db.get(IpRuleRow, entry_id)
            if row is None or row.list != which or not caller.may_act_for(row.user_id):
                raise NotFound(f"no such {which}list entry", field="id")
            owner, cidr = row.user_id, row.cidr
            await db.execute(delete(IpRuleRow).where(IpRuleRow.id == entry_id))
        await self._changed(caller, owner, f"{which}list.removed", entry_id=entry_id, cidr=cidr)

    async def check(self, owner: str, address: Address) -> Decision:
        async with self._sessions() as db:
            now = await access_of(db, owner)
        if now is None:
            raise NotFound("no such user", field="user_id")
        return addresses.decide(now, address, int(time.time() * 1000))

    async def log(self, owner: str, *, limit: int) -> list[LogEntry]:
        async with self._sessions() as db:
            rows = await db.execute(
                select(IpAccessLogRow)
                .where(IpAccessLogRow.user_id == owner)
                .order_by(IpAccessLogRow.at_ms.desc(), IpAccessLogRow.id.desc())
                .limit(limit)
            )
            return [
                LogEntry(
                    ip_address=r.address,
                    result="allowed" if r.allowed else "blocked",
                    reason=r.reason,
                    endpoint=r.endpoint,
                    at_ms=r.at_ms,
                )
                for r in rows.scalars()
            ]

    async def _changed(
        self,
        caller: Principal,
        owner: str,
        change: str,
        mode: str = "",
        *,
        entry_id: str = "",
        cidr: str = "",
    ) -> None:
        await self._projection.user(owner)
        if not mode:
            mode = (await self.config(owner)).mode
        await self._events.publish(
            IpAccessChanged(
                **fact(),
                actor=caller.user_id,
                user_id=owner,
                change=change,
                mode=mode,
                entry_id=entry_id,
                cidr=cidr,
            )
        )
