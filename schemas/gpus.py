"""GPU offers, instances and reservations as they cross the bus and sit in the registry.

An *offer* is what a provider would rent out; its `offer_id` is what a create takes. An
*instance* is an offer we rented: gpuproxy gives it its own id (`i-...`), keeps it in the
`gpuproxy-instances` KV bucket and moves it through `InstanceState` with revision-checked
updates. A *reservation* is a set of instances created together, all or nothing, held under a
lease. Money is integer micro-units per hour (1 unit = 1_000_000 micros).
"""

from __future__ import annotations

import enum

import msgspec

from schemas.errors import ErrorInfo


class ProviderName(enum.StrEnum):
    SIM = "sim"
    STATIC = "static"
    VASTAI = "vastai"
    IONET = "ionet"


PROVIDER_ALIASES: dict[str, ProviderName] = {
    "sim": ProviderName.SIM,
    "static": ProviderName.STATIC,
    "vastai": ProviderName.VASTAI,
    "vast.ai": ProviderName.VASTAI,
    "vast": ProviderName.VASTAI,
    "ionet": ProviderName.IONET,
    "io.net": ProviderName.IONET,
}
"""Names a caller may use for a provider; the original API spoke of "vast.ai" and "io.net"."""

ALL_PROVIDERS = ("", "all")
"""What a caller writes for "every configured provider"."""

LABEL_PREFIX = "gpuproxy-"
"""Every machine gpuproxy rents carries the label `gpuproxy-<instance id>` at its provider.
The reconciler recognises its own machines by it and never touches one without it."""


def label_of(instance_id: str) -> str:
    return f"{LABEL_PREFIX}{instance_id}"


def instance_of_label(label: str) -> str | None:
    """The instance id a provider label names, or None for a machine that is not ours."""
    if not label.startswith(LABEL_PREFIX):
        return None
    rest = label[len(LABEL_PREFIX) :]
    return rest if rest.startswith("i-") else None


class GpuOffer(msgspec.Struct, frozen=True, kw_only=True):
    provider: ProviderName
    offer_id: str
    gpu_model: str
    num_gpus: int
    vram_gb: int
    """Memory of one GPU, in GB."""
    price_per_hour_micros: int
    """The whole offer (every GPU of it) per hour."""
    location: str = ""
    vendor: str = ""
    tier: str = ""
    available: int = 1
    """How many machines of this offer can still be rented (a marketplace ask is one)."""
    metadata: dict[str, str] = {}


class OfferQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Filters of an offer search; zero or empty means "no filter". A provider may apply some
    server-side; the provisioner applies all of them again to what comes back."""

    providers: tuple[ProviderName, ...] = ()
    """Empty: every configured provider."""
    min_vram_gb: int = 0
    max_price_micros: int = 0
    gpu_model: str = ""
    """Case-insensitive substring of the GPU model, e.g. "a100" or "RTX 4090"."""
    location: str = ""
    """Case-insensitive prefix of the location, e.g. "US" or "EU-DE"."""
    vendor: str = ""
    tier: str = ""
    min_gpus: int = 0
    limit: int = 0
    """Most offers to return after sorting by price; 0: the default (100)."""


class LaunchSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to run on a rented machine; passed through to the provider."""

    image: str = ""
    """Container image; empty: the provider's default OpenAI-compatible server."""
    env: dict[str, str] = {}
    ports: tuple[int, ...] = ()
    """Container ports to expose; the first is the OpenAI-compatible API (default 8000)."""
    disk_gb: int = 0
    """Disk to ask for; 0: the provider's default."""


DEFAULT_API_PORT = 8000


class InstanceState(enum.StrEnum):
    PENDING = "pending"
    """Recorded; no provider call made yet."""
    PROVISIONING = "provisioning"
    """The provider is being asked to create the machine."""
    STARTING = "starting"
    """The provider created it; waiting for it to run and its endpoint to answer."""
    RUNNING = "running"
    """Its endpoint answers; serving."""
    STOPPING = "stopping"
    """Being destroyed at the provider."""
    TERMINATED = "terminated"
    FAILED = "failed"
    PREEMPTED = "preempted"
    """The provider took it back (outbid, host lost)."""


TERMINAL_STATES = frozenset(
    {InstanceState.TERMINATED, InstanceState.FAILED, InstanceState.PREEMPTED}
)

TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.PENDING: frozenset(
        {InstanceState.PROVISIONING, InstanceState.FAILED, InstanceState.STOPPING}
    ),
    InstanceState.PROVISIONING: frozenset(
        {InstanceState.STARTING, InstanceState.FAILED, InstanceState.STOPPING}
    ),
    InstanceState.STARTING: frozenset(
        {
            InstanceState.RUNNING,
            InstanceState.STOPPING,
            InstanceState.FAILED,
            InstanceState.PREEMPTED,
        }
    ),
    InstanceState.RUNNING: frozenset(
        {InstanceState.STOPPING, InstanceState.FAILED, InstanceState.PREEMPTED}
    ),
    InstanceState.STOPPING: frozenset({InstanceState.TERMINATED}),
    InstanceState.TERMINATED: frozenset(),
    InstanceState.FAILED: frozenset(),
    InstanceState.PREEMPTED: frozenset(),
}
"""The only moves an instance makes. Every transient state has a deadline (see the
provisioner's settings); the reconciler moves an instance on when it passes one."""


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One rented machine as the registry knows it."""

    id: str
    owner: str
    """The user id that pays for it."""
    provider: ProviderName
    offer_id: str
    state: InstanceState
    reason: str = ""
    """Why it is in its state: always set for a terminal one."""
    provider_id: str = ""
    """The provider's own id; empty until the provider has answered the create."""
    gpu_model: str = ""
    num_gpus: int = 0
    vram_gb: int = 0
    price_per_hour_micros: int = 0
    location: str = ""
    endpoint: str = ""
    """Base URL of its OpenAI-compatible API, once known."""
    spec: LaunchSpec = LaunchSpec()
    reservation_id: str = ""
    created_at_ms: int = 0
    state_since_ms: int = 0
    deadline_ms: int = 0
    """When a transient state must have moved on; 0 for running and terminal states."""
    billable_from_ms: int = 0
    """When the provider began charging (it accepted the create); 0: not yet."""
    metered_until_ms: int = 0
    """GPU time is reported as usage events up to here."""
    ended_at_ms: int = 0
    """When it stopped being billable (destroy asked, or found gone); 0: not yet."""
    created_by: str = ""
    """The provisioner replica that made the provider call."""
    claimed_by: str = ""
    """While provisioning: the one attempt allowed to call the provider for it (a token
    naming the replica and the attempt). Another attempt of the same command waits for its
    answer instead of renting a second machine."""
    claim_until_ms: int = 0
    """The claim holds until then; its holder renews it while the provider call runs, so a
    claim that lapses means its holder died and another attempt may take over."""
    shared: bool = False
    """An admin shared it: it serves every account's inference, not only its owner's."""


class ReservationState(enum.StrEnum):
    PENDING = "pending"
    """Instances being created; the reservation command is still working."""
    ACTIVE = "active"
    """Every instance is running and ready; the lease runs."""
    DEGRADED = "degraded"
    """Was active; some of its instances failed, were taken back or destroyed since (the
    reason names them). The others still serve and the lease still runs."""
    RELEASING = "releasing"
    """Lease ended or released: its instances are being destroyed."""
    RELEASED = "released"
    EXPIRED = "expired"
    FAILED = "failed"
    """Could not be completed, or every one of its instances ended while it was active;
    whatever was created was destroyed."""


RESERVATION_TERMINAL = frozenset(
    {ReservationState.RELEASED, ReservationState.EXPIRED, ReservationState.FAILED}
)

RESERVATION_HELD = frozenset({ReservationState.ACTIVE, ReservationState.DEGRADED})
"""A reservation in one of these was completed and holds machines under its lease: it follows
its instances, renews, expires and is released."""


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    owner: str
    count: int
    state: ReservationState
    reason: str = ""
    instance_ids: tuple[str, ...] = ()
    query: OfferQuery = OfferQuery()
    spec: LaunchSpec = LaunchSpec()
    strategy: str = ""
    lease_seconds: int = 0
    lease_expires_at_ms: int = 0
    created_at_ms: int = 0
    updated_at_ms: int = 0
    deadline_ms: int = 0
    """When a pending reservation is given up and rolled back."""
    ending: str = ""
    """While releasing: `released` or `expired`, the state it ends in."""
    error: ErrorInfo | None = None
    """Why a failed reservation failed, as its caller was answered."""


PLACEMENT_STRATEGIES = ("cheapest", "spread", "performance")
"""How a reservation may pick its offers (the provisioner documents each)."""
