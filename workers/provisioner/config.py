"""The provisioner's own settings, filled in by the command line from the environment."""

from __future__ import annotations

from pathlib import Path

import msgspec


class ProvisionerConfig(msgspec.Struct, frozen=True, kw_only=True):
    sim_dir: Path
    """Where the `sim` marketplace keeps its machines (shared by every replica on a host)."""
    sim_owner_pid: int = 0
    """The process whose end stops every sim machine (the supervisor; 0: none)."""
    providers: tuple[str, ...] = ()
    """Providers to offer; empty: every configured one, and `sim` when no other is."""
    pending_seconds: float = 60.0
    """A recorded instance must reach its provider call within this."""
    provisioning_seconds: float = 300.0
    """The provider must have accepted the create within this."""
    start_seconds: float = 900.0
    """An accepted instance must be running with its endpoint answering within this."""
    stop_seconds: float = 300.0
    """A destroy must be confirmed by the provider within this; later, it is retried."""
    reconcile_seconds: float = 10.0
    """Between two comparisons of every provider's list with the registry."""
    meter_seconds: float = 5.0
    """Between two passes that turn GPU time into usage events."""
    lease_seconds: float = 10.0
    """The reconciler's leadership lease: a dead leader is replaced after this."""
    placement: str = "cheapest"
    """How reservations pick offers when the request names no strategy."""
    upstream_secret: bytes | None = None
    """What machines' API keys derive from (`workers.common.upstream_keys`); None: machines
    are started without one."""
    search_seconds: float = 20.0
    """How long one offer search waits for each provider."""
