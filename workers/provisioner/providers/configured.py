"""Which providers this deployment offers, built from the environment.

A marketplace without its API key is simply not offered. `GPUPROXY_PROVIDERS` names the
providers to offer outright; when it is empty, every configured provider is offered, and the
local `sim` marketplace when no other is (a first run, tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Mapping

from nats.js import JetStreamContext

from bus.topology import declare_bucket
from schemas import topology
from schemas.errors import ConfigError
from schemas.gpus import PROVIDER_ALIASES, ProviderName
from workers.provisioner.config import ProvisionerConfig
from workers.provisioner.providers import ionet, static, vastai
from workers.provisioner.providers.base import Provider
from workers.provisioner.providers.sim import SimProvider

PROVIDERS_SETTING = "GPUPROXY_PROVIDERS"


def wanted(names: tuple[str, ...]) -> list[ProviderName]:
    chosen: list[ProviderName] = []
    for raw in names:
        name = PROVIDER_ALIASES.get(raw.strip().lower())
        if name is None:
            raise ConfigError(
                f"unknown provider {raw.strip()!r}; known: {', '.join(ProviderName)}",
                field=PROVIDERS_SETTING,
            )
        if name not in chosen:
            chosen.append(name)
    return chosen


async def configured_providers(
    js: JetStreamContext,
    config: ProvisionerConfig,
    env: Mapping[str, str],
    *,
    replicas: int = 1,
) -> dict[ProviderName, Provider]:
    asked = wanted(config.providers)
    found: dict[ProviderName, Provider] = {}
    if not asked or ProviderName.STATIC in asked:
        claims = await declare_bucket(js, topology.static_claims_bucket(replicas))
        static_provider = static.from_env(env, claims)
        if static_provider is not None:
            found[ProviderName.STATIC] = static_provider
    if not asked or ProviderName.VASTAI in asked:
        vast = vastai.from_env(env)
        if vast is not None:
            found[ProviderName.VASTAI] = vast
    if not asked or ProviderName.IONET in asked:
        io = ionet.from_env(env)
        if io is not None:
            found[ProviderName.IONET] = io
    if ProviderName.SIM in asked or (not asked and not found):
        found[ProviderName.SIM] = SimProvider(config.sim_dir, owner_pid=config.sim_owner_pid)
    for name in asked:
        if name not in found:
            for provider in found.values():
                await provider.close()
            raise ConfigError(
                f"provider {name} is asked for but not configured ({_needs(name)})",
                field=PROVIDERS_SETTING,
            )
    return found


def _needs(name: ProviderName) -> str:
    return {
        ProviderName.STATIC: "set GPUPROXY_STATIC_ENDPOINTS",
        ProviderName.VASTAI: "set VASTAI_API_KEY",
        ProviderName.IONET: "set IONET_API_KEY",
        ProviderName.SIM: "always available",
    }[name]
