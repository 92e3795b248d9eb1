"""Model names as callers use them: aliases, and a fallback chain per model.

`GPUPROXY_MODEL_ROUTES` (inline JSON, or the path of a TOML file of the same shape):

    {"aliases": {"fast": "sim-llama-3-8b"},
     "fallbacks": {"llama-3-70b": ["llama-3-8b", "sim-llama-3-8b"]}}

An alias names a served model; a request for a model that no machine the caller can reach
serves right now goes to the first model of its fallback chain that one does. The machine is
asked for the model it serves (the body's `model` is rewritten), and the answer, the usage
and its price are that model's.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import msgspec

from schemas.errors import ConfigError

ENV_VAR = "GPUPROXY_MODEL_ROUTES"


class ModelRoutes(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    aliases: dict[str, str] = {}
    fallbacks: dict[str, list[str]] = {}

    def chain(self, asked: str) -> list[str]:
        """The models to try for `asked`, in order, each once."""
        first = self.aliases.get(asked, asked)
        chain = [first]
        for name in (*self.fallbacks.get(asked, ()), *self.fallbacks.get(first, ())):
            served = self.aliases.get(name, name)
            if served not in chain:
                chain.append(served)
        return chain


def parse_model_routes(raw: str) -> ModelRoutes:
    text = raw.strip()
    if not text:
        return ModelRoutes()
    try:
        if text.startswith("{"):
            document = json.loads(text)
        else:
            document = tomllib.loads(Path(text).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"is neither a JSON object nor a readable TOML file ({type(exc).__name__})",
            field=ENV_VAR,
        ) from None
    try:
        routes = msgspec.convert(document, ModelRoutes)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc), field=ENV_VAR) from None
    for alias, target in routes.aliases.items():
        if target in routes.aliases:
            raise ConfigError(
                f"alias {alias!r} names another alias ({target!r}); name a model", field=ENV_VAR
            )
    return routes
