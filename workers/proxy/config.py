"""The proxy worker's own settings, filled in by the command line from the environment."""

from __future__ import annotations

import msgspec

from schemas.balancing import Strategy
from schemas.prices import DEFAULT_PRICES, PriceTable
from workers.common.static_endpoints import StaticEndpoint
from workers.proxy.model_routes import ModelRoutes


class ProxyConfig(msgspec.Struct, frozen=True, kw_only=True):
    prices: PriceTable = DEFAULT_PRICES
    """Per-model prices (`GPUPROXY_PRICES` over the defaults for the `sim` models)."""
    upstream_allow: str = ""
    """`GPUPROXY_UPSTREAM_ALLOW`: networks an upstream may be in although they are private."""
    request_timeout: float = 300.0
    """The longest one inference request may take upstream, unless the request says less."""
    strategy: Strategy = Strategy.ROUND_ROBIN
    """`LB_STRATEGY`: how a machine is picked among those serving a request."""
    upstream_secret: bytes | None = None
    """What machines' API keys derive from (`workers.common.upstream_keys`)."""
    static_endpoints: tuple[StaticEndpoint, ...] = ()
    """`GPUPROXY_STATIC_ENDPOINTS`: the shared ones are routes of their own; each one's key
    reaches the proxy here, never through the bus."""
    model_routes: ModelRoutes = ModelRoutes()
    """`GPUPROXY_MODEL_ROUTES`: aliases and fallback chains."""
    models_refresh_seconds: float = 60.0
    """How often each machine is asked again which models it serves."""
