"""Inference as both front doors send it: one `Inference` command, answered whole or as a
stream that starts only once its first piece is there (so an error before it is an ordinary
error, not a broken stream)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

import msgspec

from bus.caller import CommandCaller
from gateway import validation
from gateway.auth.principal import Principal
from gateway.inference import requests
from gateway.inference.requests import Checked
from gateway.inference.targets import target
from schemas.commands import Inference
from schemas.inference import Api, InferenceDone
from schemas.replies import Data, Result
from schemas.subjects import WorkerKind

SESSION_HEADER = "x-session-id"
"""Keeps a conversation on one machine under `session_affinity`."""
SILENCE_SECONDS = 3.0
"""A worker streaming an answer sends something every second (`bus.runtime.PULSE_SECONDS`);
after three seconds of nothing it is gone, and the client hears so."""
COST_HEADER = "x-gpuproxy-cost-micros"

Pieces = AsyncGenerator[Data | Result, None]


class InferenceService:
    def __init__(self, caller: CommandCaller) -> None:
        self._caller = caller

    @staticmethod
    def command(
        who: Principal,
        api: Api,
        checked: Checked,
        *,
        idempotency_key: str | None,
        key_field: str,
        instance_id: str = "",
        session_key: str = "",
    ) -> Inference:
        return Inference(
            command_id=validation.command_id(idempotency_key, field=key_field, owner=who.user_id),
            actor=who.user_id,
            actor_admin=who.is_admin,
            actor_role=str(who.role),
            api=api,
            model=checked.model,
            instance_id=instance_id,
            body=msgspec.Raw(checked.body),
            stream=checked.stream,
            session_key=session_key or checked.session_key,
        )

    def targeted(
        self,
        who: Principal,
        *,
        target_url: str,
        protocol: str,
        method: str,
        body: bytes,
        headers: Mapping[str, str],
        idempotency_key: str | None,
        key_field: str,
    ) -> Inference:
        """A request that names its model or machine in a `target_url` (gRPC, the original
        HTTP route, the WebSocket), never a host."""
        aim = target(target_url, protocol, method)
        checked = requests.check(aim.api, body, target_model=aim.model)
        session = next((v for k, v in headers.items() if k.lower() == SESSION_HEADER), "")
        return self.command(
            who,
            aim.api,
            checked,
            idempotency_key=idempotency_key,
            key_field=key_field,
            instance_id=aim.instance_id,
            session_key=session,
        )

    async def whole(self, command: Inference, *, timeout: float) -> InferenceDone:
        done = await self._caller.call(WorkerKind.PROXY, command, timeout=timeout)
        assert isinstance(done, InferenceDone)
        return done

    async def stream(
        self, command: Inference, *, timeout: float
    ) -> tuple[Data | InferenceDone, Pieces]:
        """The first piece (or the whole answer, when the machine refused before streaming)
        and the rest; the caller closes the rest when it is done with it."""
        pieces = self._caller.stream(
            WorkerKind.PROXY, command, timeout=timeout, silence=SILENCE_SECONDS
        )
        try:
            first = await anext(pieces)
        except BaseException:
            await pieces.aclose()
            raise
        if isinstance(first, Result):
            await pieces.aclose()
            assert isinstance(first.result, InferenceDone)
            return first.result, pieces
        return first, pieces


def bounded_timeout(asked: float, default: float) -> float:
    """A request's own timeout in seconds, never past the gateway's; 0 or less: the default."""
    return min(float(asked), default) if asked > 0 else default


def whole_body(done: InferenceDone) -> bytes:
    raw = bytes(done.body)
    return b"{}" if raw == b"null" else raw
