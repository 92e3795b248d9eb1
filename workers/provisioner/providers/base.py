"""The one small interface every GPU provider implements.

A provider knows its own marketplace and nothing of gpuproxy's registry: it searches offers,
creates a machine from an offer under a label, reports machines, destroys them, and says
whether a machine's endpoint answers. The provisioner owns state, deadlines and retries of
whole operations; a provider retries only what its own API asks it to (429 with backoff).

Errors a provider raises are `schemas.errors` ones, with messages written for the caller
(the provider's own reason included, never an API key):
- `Unavailable`: the provider cannot be reached, times out, answers 5xx, or keeps answering
  429 after the backoff budget.
- `FailedPrecondition`: the provider refuses for a reason that retrying will not fix (the
  offer is already taken, the price was outbid, the request is not acceptable).
- `NotFound`: only from `search`-independent lookups that name an unknown id, where noted.
"""

from __future__ import annotations

import abc
import enum

import httpx
import msgspec

from schemas.gpus import GpuOffer, LaunchSpec, OfferQuery, ProviderName


class MachineStatus(enum.StrEnum):
    """A provider's many status words folded into what the provisioner acts on."""

    CREATING = "creating"
    """Accepted; being scheduled, image pulling, booting."""
    RUNNING = "running"
    """The provider says it runs (its endpoint may still be starting)."""
    STOPPED = "stopped"
    """Not running and not coming back by itself: outbid, paused, host lost."""
    EXITED = "exited"
    """Its container ended or it failed to start."""


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    """One machine as its provider reports it."""

    provider_id: str
    label: str
    """What the create was given; `schemas.gpus.label_of(instance id)` for ours."""
    status: MachineStatus
    message: str = ""
    """The provider's own words about the status (e.g. vast.ai's `status_msg`)."""
    endpoint: str = ""
    """Base URL of the OpenAI-compatible API (`http://host:port`), once the provider
    reports an address and port for it."""
    interruptible: bool = False


class Provider(abc.ABC):
    name: ProviderName

    @abc.abstractmethod
    async def search(self, query: OfferQuery) -> list[GpuOffer]:
        """Offers that may match `query`; filtering server-side is an optimisation only."""

    @abc.abstractmethod
    async def create(self, offer_id: str, spec: LaunchSpec, *, label: str) -> str:
        """Rent `offer_id` and start `spec` on it, labelled `label`; returns the provider's
        id of the new machine. Not idempotent at the provider: the provisioner looks for a
        machine with the label before it calls this a second time."""

    @abc.abstractmethod
    async def get(self, provider_id: str) -> Machine | None:
        """The machine, or None when the provider no longer has it."""

    @abc.abstractmethod
    async def list(self) -> list[Machine]:
        """Every machine this account holds at the provider, ours (labelled) and others."""

    @abc.abstractmethod
    async def destroy(self, provider_id: str) -> None:
        """Destroy the machine; one that is already gone counts as destroyed."""

    async def ready(self, machine: Machine, *, timeout: float = 5.0, key: str = "") -> bool:
        """Whether the machine's OpenAI-compatible endpoint answers `GET /v1/models` (with
        the machine's own API key, when it was started with one)."""
        if machine.status is not MachineStatus.RUNNING or not machine.endpoint:
            return False
        headers = {"authorization": f"Bearer {key}"} if key else {}
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                answer = await client.get(
                    f"{machine.endpoint.rstrip('/')}/v1/models", headers=headers
                )
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    async def close(self) -> None:  # noqa: B027 - most providers hold nothing to release
        """Release connections; the provider is not used afterwards."""
