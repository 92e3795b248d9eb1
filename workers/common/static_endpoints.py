"""Bring-your-own endpoints as configured: `GPUPROXY_STATIC_ENDPOINTS`.

Read by the provisioner (which rents them as offers) and by the proxy (which serves the
shared ones to every account, and presents each endpoint's own key): one parser, so the two
never read the configuration differently.

A value starting with `[` is an inline JSON array of endpoints, anything else is the path of
a TOML file with `[[endpoints]]` tables. An upstream API key never appears in the
configuration: `api_key_env` names the environment variable that holds it, and the key is
kept out of every repr, log line and error.
"""

from __future__ import annotations

import hmac
import json
import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from schemas.catalogue import classify
from schemas.errors import ConfigError

ENV_VAR = "GPUPROXY_STATIC_ENDPOINTS"
MICROS_PER_UNIT = 1_000_000

ENDPOINT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYS = frozenset(
    (
        "name",
        "url",
        "gpu_model",
        "num_gpus",
        "vram_gb",
        "price_per_hour",
        "location",
        "api_key_env",
        "shared",
        "shared_with",
    )
)
_MAX_GPUS = 1024
_MAX_VRAM_GB = 4096
_MAX_PRICE = Decimal(1_000_000)
"""Units per hour; anything above is a typo (or micros written as units)."""


class UpstreamKey:
    """An upstream API key: shown as `<upstream key>` wherever it is printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<upstream key>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UpstreamKey):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(UpstreamKey)


class StaticEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One configured endpoint."""

    name: str
    """Unique; the offer id and the provider id of the machine it becomes."""
    url: str
    """Base URL of the OpenAI-compatible API, without a trailing `/` and without `/v1`."""
    gpu_model: str
    """As written in the configuration; offers show the catalogue's canonical model."""
    vram_gb: int
    price_per_hour_micros: int
    """The whole endpoint (every GPU of it) per hour."""
    num_gpus: int = 1
    location: str = ""
    api_key_env: str = ""
    """The name of the variable the key was read from, never the key."""
    api_key: UpstreamKey | None = None
    shared: bool = False
    """Serves inference to accounts without being rented: every account, or those of
    `shared_with`. A shared endpoint is not offered for rent."""
    shared_with: frozenset[str] = frozenset()
    """Roles (`user`, `admin`, ...) or account ids the shared endpoint serves; empty: all."""


# --- configuration ---------------------------------------------------------------------------


def _fault(message: str) -> ConfigError:
    return ConfigError(message, field=ENV_VAR)


def load_endpoints(env: Mapping[str, str]) -> list[StaticEndpoint]:
    """The endpoints `GPUPROXY_STATIC_ENDPOINTS` declares; none when it is unset or blank."""
    raw = env.get(ENV_VAR, "").strip()
    if not raw:
        return []
    entries = _json_entries(raw) if raw.startswith("[") else _toml_entries(Path(raw))
    endpoints: list[StaticEndpoint] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        endpoint = _endpoint(f"endpoints[{index}]", entry, env)
        if endpoint.name in seen:
            raise _fault(
                f"endpoints[{index}].name {endpoint.name!r} is already used by "
                f"endpoints[{seen[endpoint.name]}]"
            )
        seen[endpoint.name] = index
        endpoints.append(endpoint)
    return endpoints


def _json_entries(raw: str) -> list[Any]:
    try:
        entries = json.loads(raw, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        # The error's own text names a position only, never the content.
        raise _fault(f"is not a valid JSON array of endpoints: {exc.msg} at {exc.pos}") from None
    if not isinstance(entries, list):
        raise _fault("is not a valid JSON array of endpoints")
    return entries


def _toml_entries(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fault(f"names {path}, which cannot be read ({type(exc).__name__})") from None
    try:
        document = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise _fault(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"endpoints"})
    if unknown:
        raise _fault(f"{path} has unknown top-level key {unknown[0]!r}; expected [[endpoints]]")
    entries = document.get("endpoints", [])
    if not isinstance(entries, list):
        raise _fault(f"{path}: endpoints must be an array of tables ([[endpoints]])")
    return entries


def _endpoint(where: str, entry: object, env: Mapping[str, str]) -> StaticEndpoint:
    if not isinstance(entry, dict):
        raise _fault(f"{where} must be a table of settings")
    for key in entry:
        if key == "api_key":
            raise _fault(
                f"{where}.api_key: the key itself does not belong in the configuration; "
                "set api_key_env to the name of the environment variable that holds it"
            )
        if key not in _KEYS:
            raise _fault(f"{where} has unknown key {key!r}; known: {', '.join(sorted(_KEYS))}")
    name = _text(where, entry, "name", required=True)
    if not ENDPOINT_NAME.fullmatch(name):
        raise _fault(f"{where}.name must be 1-64 letters, digits, '_' or '-'")
    gpu_model = _text(where, entry, "gpu_model", required=True)
    typical = classify(gpu_model).vram_gb
    if "vram_gb" not in entry and not typical:
        raise _fault(f"{where}.vram_gb is required: the GPU catalogue does not know {gpu_model!r}")
    vram_gb = _whole(where, entry, "vram_gb", default=typical, most=_MAX_VRAM_GB)
    key_env = _text(where, entry, "api_key_env")
    return StaticEndpoint(
        name=name,
        url=_url(where, entry),
        gpu_model=gpu_model,
        vram_gb=vram_gb,
        price_per_hour_micros=_micros(where, entry),
        num_gpus=_whole(where, entry, "num_gpus", default=1, most=_MAX_GPUS),
        location=_text(where, entry, "location"),
        api_key_env=key_env,
        api_key=_key(where, key_env, env) if key_env else None,
        shared=_flag(where, entry, "shared"),
        shared_with=_names(where, entry, "shared_with"),
    )


def _flag(where: str, entry: dict[str, Any], key: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise _fault(f"{where}.{key} must be true or false")
    return value


def _names(where: str, entry: dict[str, Any], key: str) -> frozenset[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _fault(f"{where}.{key} must be a list of roles or account ids")
    if value and not entry.get("shared", False):
        raise _fault(f"{where}.{key} needs shared = true")
    return frozenset(v.strip() for v in value)


def _text(where: str, entry: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise _fault(f"{where}.{key} must be a string")
    value = value.strip()
    if required and not value:
        raise _fault(f"{where}.{key} is required")
    return value


def _whole(where: str, entry: dict[str, Any], key: str, *, default: int, most: int) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise _fault(f"{where}.{key} must be a whole number from 1 to {most}")
    return value


def _url(where: str, entry: dict[str, Any]) -> str:
    # The value is never echoed: a URL may carry credentials a user pasted by mistake.
    raw = _text(where, entry, "url", required=True)
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _fault(f"{where}.url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fault(f"{where}.url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise _fault(
            f"{where}.url must not carry credentials; set api_key_env to the name of the "
            "environment variable that holds the key"
        )
    if parts.query or parts.fragment:
        raise _fault(f"{where}.url must not have a query or a fragment")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        raise _fault(f"{where}.url must be the server's base URL, without /v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def _micros(where: str, entry: dict[str, Any]) -> int:
    if "price_per_hour" not in entry:
        raise _fault(f'{where}.price_per_hour is required (units per hour, e.g. "0.45")')
    value = entry["price_per_hour"]
    if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
        raise _fault(f'{where}.price_per_hour must be a decimal number, e.g. "0.45"')
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise _fault(f'{where}.price_per_hour must be a decimal number, e.g. "0.45"') from None
    if not price.is_finite():
        raise _fault(f"{where}.price_per_hour must be a finite number")
    if price < 0:
        raise _fault(f"{where}.price_per_hour must not be negative")
    if price > _MAX_PRICE:
        raise _fault(f"{where}.price_per_hour must be at most {_MAX_PRICE} units per hour")
    micros = price * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise _fault(f"{where}.price_per_hour has more than 6 decimal places")
    return int(micros)


def _key(where: str, name: str, env: Mapping[str, str]) -> UpstreamKey:
    if not _ENV_NAME.fullmatch(name):
        raise _fault(f"{where}.api_key_env must be the name of an environment variable")
    value = env.get(name, "").strip()
    if not value:
        raise _fault(f"{where}.api_key_env names {name}, which is not set")
    return UpstreamKey(value)
