"""One instance's way through its states, driven from wherever it stands.

Every step reads the registry first and picks up where the record is, so the same code serves
a first attempt, a command redelivered after a crash, a duplicate delivery running at the
same time, and the reconciler. The one step that is not idempotent at a provider, the create,
is guarded by a claim in the record: the attempt that moves the instance to `provisioning`
claims it (a revision-checked update) before the provider call and renews the claim while the
call runs. Another attempt that finds a live claim waits for the claimant's answer and adopts
it; only when a claim lapses (its holder died) does another attempt take over, and it first
looks for a machine carrying the instance's label. A machine is never created twice for one
instance; should a takeover miss the first machine (a provider that lists it late), whichever
machine is recorded second is destroyed by the attempt that made it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time

import msgspec

from bus.tasks import cancel_and_wait
from schemas.errors import FailedPrecondition, GpuproxyError, NotFound, Unavailable
from schemas.gpus import (
    TERMINAL_STATES,
    GpuOffer,
    Instance,
    InstanceState,
    LaunchSpec,
    ProviderName,
    label_of,
)
from workers.common.upstream_keys import KEY_ENV, UpstreamKeys
from workers.provisioner import faults
from workers.provisioner.cancellation import to_the_end
from workers.provisioner.fleet import Fleet
from workers.provisioner.providers.base import Machine, MachineStatus, Provider
from workers.provisioner.registry import Registry, now_ms

log = logging.getLogger("gpuproxy.provisioner")

READY_POLL_FIRST = 0.05
READY_POLL_MOST = 3.0
"""Looks at a starting machine come quickly at first (a local server is up in a fraction of a
second) and then further apart (a marketplace machine pulls its image for minutes, and its
API limits the rate of calls)."""

CLAIM_SECONDS = 6.0
"""How long a claim on an instance's provider call holds unless renewed. Its holder renews it
three times within this while the call runs, so only a dead holder's claim lapses, and the
command's next delivery takes over a few seconds later."""
CLAIM_POLL_MOST = 0.5
"""The longest pause between two looks at a claim another attempt holds."""


def instance_id_for(command_id: str, index: int) -> str:
    """The same command (a redelivery, a retry with its idempotency key) names the same
    instances, so nothing it creates can be created twice."""
    digest = hashlib.blake2b(f"{command_id}/{index}".encode(), digest_size=10).hexdigest()
    return f"i-{digest}"


def new_instance(
    instance_id: str,
    owner: str,
    offer: GpuOffer,
    spec: LaunchSpec,
    *,
    reservation_id: str = "",
) -> Instance:
    return Instance(
        id=instance_id,
        owner=owner,
        provider=offer.provider,
        offer_id=offer.offer_id,
        state=InstanceState.PENDING,
        gpu_model=offer.gpu_model,
        num_gpus=offer.num_gpus,
        vram_gb=offer.vram_gb,
        price_per_hour_micros=offer.price_per_hour_micros,
        location=offer.location,
        spec=spec,
        reservation_id=reservation_id,
    )


class Launcher:
    def __init__(
        self,
        registry: Registry,
        fleet: Fleet,
        *,
        worker_id: str,
        claim_seconds: float = CLAIM_SECONDS,
        keys: UpstreamKeys | None = None,
    ) -> None:
        self._registry = registry
        self._fleet = fleet
        self._worker_id = worker_id
        self._claim_seconds = claim_seconds
        self._keys = keys

    def _key_of(self, instance: Instance) -> str:
        """The machine's own API key; none for a static endpoint (it has its own) or when
        no upstream secret is configured."""
        if self._keys is None or instance.provider is ProviderName.STATIC:
            return ""
        return self._keys.of(instance.id)

    def _launch_spec(self, instance: Instance) -> LaunchSpec:
        key = self._key_of(instance)
        if not key:
            return instance.spec
        # Only the provider call carries it: the record keeps the spec the user asked for.
        return msgspec.structs.replace(instance.spec, env={**instance.spec.env, KEY_ENV: key})

    def _provider(self, name: ProviderName) -> Provider:
        return self._fleet.provider(name)

    async def _current(self, instance_id: str) -> Instance:
        found = await self._registry.instance(instance_id)
        if found is None:
            raise NotFound(f"instance {instance_id} does not exist", field="instance_id")
        return found

    async def find_machine(self, instance: Instance) -> Machine | None:
        """The instance's machine at its provider: by its id when known, else by label."""
        provider = self._provider(instance.provider)
        label = label_of(instance.id)
        if instance.provider_id:
            machine = await provider.get(instance.provider_id)
            # A provider may reuse an id (a static endpoint is claimed again by the next
            # instance): a machine under another label is not this instance's any more.
            if machine is not None and machine.label and machine.label != label:
                return None
            return machine
        for machine in await provider.list():
            if machine.label == label:
                return machine
        return None

    async def launch(self, instance_id: str) -> Instance:
        """Take the instance to `starting` (the provider accepted it). Raises the provider's
        refusal after recording the instance `failed` with it."""
        token = f"{self._worker_id}/{secrets.token_hex(6)}"
        instance = await self._current(instance_id)
        while True:
            if instance.state is InstanceState.PENDING:
                claimed = await self._registry.move(
                    instance_id,
                    InstanceState.PROVISIONING,
                    reason="asking the provider",
                    only_from=frozenset({InstanceState.PENDING}),
                    created_by=self._worker_id,
                    claimed_by=token,
                    claim_until_ms=now_ms() + int(self._claim_seconds * 1000),
                )
                if claimed is not None:
                    return await to_the_end(self._create(claimed, token, adopt=False))
            elif instance.state is InstanceState.PROVISIONING:
                if instance.claim_until_ms > now_ms():
                    instance = await self._await_claim(instance)
                    continue
                taken = await self._take_over(instance_id, token)
                if taken is not None:
                    # The holder died, perhaps after the provider answered it.
                    return await to_the_end(self._create(taken, token, adopt=True))
            else:
                return instance
            instance = await self._current(instance_id)

    async def _await_claim(self, instance: Instance) -> Instance:
        """Wait while another attempt holds the instance's provider call; the record as it
        is once that attempt has answered (or its claim lapsed)."""
        pause = READY_POLL_FIRST
        while True:
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, CLAIM_POLL_MOST)
            current = await self._current(instance.id)
            if (
                current.state is not InstanceState.PROVISIONING
                or current.claimed_by != instance.claimed_by
                or current.claim_until_ms <= now_ms()
            ):
                return current

    async def _take_over(self, instance_id: str, token: str) -> Instance | None:
        def mutate(current: Instance) -> Instance | None:
            at = now_ms()
            if current.state is not InstanceState.PROVISIONING or current.claim_until_ms > at:
                return None
            return msgspec.structs.replace(
                current,
                claimed_by=token,
                claim_until_ms=at + int(self._claim_seconds * 1000),
                created_by=self._worker_id,
            )

        return await self._registry.amend(instance_id, mutate)

    async def _keep_claim(self, instance_id: str, token: str) -> None:
        def mutate(current: Instance) -> Instance | None:
            if current.state is not InstanceState.PROVISIONING or current.claimed_by != token:
                return None
            return msgspec.structs.replace(
                current, claim_until_ms=now_ms() + int(self._claim_seconds * 1000)
            )

        while True:
            await asyncio.sleep(self._claim_seconds / 3)
            try:
                if await self._registry.amend(instance_id, mutate) is None:
                    return  # moved on, or taken over: nothing of ours to hold
            except Exception as exc:
                log.warning("instance %s: claim not renewed (%s)", instance_id, type(exc).__name__)

    async def _create(self, instance: Instance, token: str, *, adopt: bool) -> Instance:
        """The provider call of a claimed instance, and its answer written down."""
        provider = self._provider(instance.provider)
        label = label_of(instance.id)
        existing = await self.find_machine(instance) if adopt else None
        if existing is not None:
            provider_id = existing.provider_id
        else:
            faults.checkpoint("create.before_provider_call")
            keeper = asyncio.create_task(
                self._keep_claim(instance.id, token), name=f"claim-{instance.id}"
            )
            try:
                provider_id = await provider.create(
                    instance.offer_id, self._launch_spec(instance), label=label
                )
            except GpuproxyError as exc:
                await self._registry.move(
                    instance.id,
                    InstanceState.FAILED,
                    reason=f"{instance.provider} refused the create: {exc.message}",
                )
                raise
            finally:
                await cancel_and_wait([keeper])
            faults.checkpoint("create.after_provider_call")
        moved = await self._registry.move(
            instance.id,
            InstanceState.STARTING,
            reason="accepted by the provider",
            only_from=frozenset({InstanceState.PROVISIONING}),
            provider_id=provider_id,
        )
        if moved is not None:
            return moved
        current = await self._current(instance.id)
        if current.state in TERMINAL_STATES or current.state is InstanceState.STOPPING:
            # Destroyed or failed while the provider was answering: the machine must not
            # outlive its record.
            await self._destroy_machine(provider, provider_id)
            if current.state is InstanceState.STOPPING:
                return await self._finish_stop(current)
        elif current.provider_id and current.provider_id != provider_id:
            # Another attempt recorded its machine first (this one's claim had lapsed).
            await self._destroy_machine(provider, provider_id)
        return current

    async def observe(self, instance: Instance) -> Instance:
        """Compare a starting or running instance with its machine and move it accordingly."""
        if instance.state not in (InstanceState.STARTING, InstanceState.RUNNING):
            return instance
        provider = self._provider(instance.provider)
        machine = await self.find_machine(instance)
        if machine is None:
            moved = await self._registry.move(
                instance.id,
                InstanceState.FAILED,
                reason=f"{instance.provider} no longer has the machine",
            )
            return moved or await self._current(instance.id)
        if machine.status is MachineStatus.EXITED:
            why = machine.message or "its container exited"
            moved = await self._registry.move(
                instance.id, InstanceState.FAILED, reason=f"exited at {instance.provider}: {why}"
            )
            await self._destroy_machine(provider, machine.provider_id)
            return moved or await self._current(instance.id)
        if machine.status is MachineStatus.STOPPED:
            why = machine.message or "stopped by the provider"
            moved = await self._registry.move(
                instance.id, InstanceState.PREEMPTED, reason=f"{instance.provider}: {why}"
            )
            await self._destroy_machine(provider, machine.provider_id)
            return moved or await self._current(instance.id)
        if instance.state is InstanceState.STARTING:
            if instance.deadline_ms and now_ms() > instance.deadline_ms:
                return await self._give_up(instance, machine, provider)
            if machine.status is MachineStatus.RUNNING and await provider.ready(
                machine, key=self._key_of(instance)
            ):
                moved = await self._registry.move(
                    instance.id,
                    InstanceState.RUNNING,
                    reason="its endpoint answers",
                    only_from=frozenset({InstanceState.STARTING}),
                    endpoint=machine.endpoint,
                )
                return moved or await self._current(instance.id)
        return instance

    async def _give_up(self, instance: Instance, machine: Machine, provider: Provider) -> Instance:
        waited = (instance.deadline_ms - instance.state_since_ms) / 1000
        moved = await self._registry.move(
            instance.id,
            InstanceState.FAILED,
            reason=f"did not become ready within {waited:g}s ({machine.status}"
            + (f": {machine.message})" if machine.message else ")"),
        )
        await self._destroy_machine(provider, machine.provider_id)
        return moved or await self._current(instance.id)

    async def await_ready(self, instance_id: str, deadline: float) -> Instance:
        """Watch the instance until it runs, ends, or the monotonic `deadline` passes."""
        pause = READY_POLL_FIRST
        while True:
            instance = await self._current(instance_id)
            if instance.state is InstanceState.RUNNING or instance.state in TERMINAL_STATES:
                return instance
            if instance.state is InstanceState.STOPPING:
                return instance
            try:
                instance = await self.observe(instance)
            except Unavailable as exc:
                log.info("instance %s: provider did not answer (%s)", instance_id, exc.message)
            if instance.state is InstanceState.RUNNING or instance.state in TERMINAL_STATES:
                return instance
            if time.monotonic() >= deadline:
                return instance
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, READY_POLL_MOST)

    async def destroy(self, instance_id: str, *, reason: str) -> Instance:
        """Stop the instance and release its machine; answers `stopping` when the provider
        cannot confirm now (the reconciler keeps at it) and `terminated` when it did."""
        instance = await self._current(instance_id)
        if instance.state in TERMINAL_STATES:
            # Failed or preempted records may still have a machine (the destroy after the
            # move did not get through): try again, harmlessly.
            await self._release_machine(instance)
            return instance
        if instance.state is not InstanceState.STOPPING:
            moved = await self._registry.move(instance_id, InstanceState.STOPPING, reason=reason)
            instance = moved or await self._current(instance_id)
            if instance.state is not InstanceState.STOPPING:
                return await self.destroy(instance_id, reason=reason)
        return await self._finish_stop(instance)

    async def _finish_stop(self, instance: Instance) -> Instance:
        try:
            gone = await self._release_machine(instance)
        except GpuproxyError as exc:
            log.warning("instance %s: destroy not confirmed yet (%s)", instance.id, exc.message)
            return instance
        if not gone:
            return instance
        moved = await self._registry.move(
            instance.id,
            InstanceState.TERMINATED,
            reason=instance.reason or "destroyed",
        )
        return moved or await self._current(instance.id)

    async def _release_machine(self, instance: Instance) -> bool:
        """Destroy the instance's machine if it has one; True once none exists."""
        provider = self._provider(instance.provider)
        machine = await self.find_machine(instance)
        if machine is None:
            return True
        await provider.destroy(machine.provider_id)
        return True

    async def _destroy_machine(self, provider: Provider, provider_id: str) -> None:
        try:
            await provider.destroy(provider_id)
        except GpuproxyError as exc:
            # The reconciler destroys machines whose record has ended; it will try again.
            log.warning("destroying %s at %s failed: %s", provider_id, provider.name, exc.message)

    async def offer(self, provider: ProviderName, offer_id: str) -> GpuOffer:
        found = await self._fleet.offer(provider, offer_id)
        if found is None or found.available < 1:
            raise FailedPrecondition(
                f"offer {offer_id} is not available at {provider}", field="instance_id"
            )
        return found
