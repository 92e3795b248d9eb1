"""vast.ai as a GPU provider, over the REST API its official client (vast-ai/vast-python,
`vast.py`) and docs.vast.ai describe; base `https://console.vast.ai/api/v0`, bearer key.

- search: `POST /bundles/` with a query object (`{"field": {"op": value}}`, ops eq, neq, gt,
  gte, lt, lte, in, notin, plus `order`, `type`, `limit`) -> `{"offers": [...]}`.
- create: `PUT /asks/{ask id}/` -> `{"success": true, "new_contract": <instance id>}`.
- get: `GET /instances/{id}/?owner=me` -> `{"instances": {...}}` (one object, as `vastai show
  instance` reads it); list: `GET /instances?owner=me` -> `{"instances": [...]}`.
- destroy: `DELETE /instances/{id}/`; one the provider no longer has counts as destroyed.

Offer ids and interruptible (bid) rentals. An on-demand offer's id is vast.ai's ask id
(`"4242"`); an interruptible one is `"<ask id>:bid=<$ per hour>"` (`"4242:bid=0.15"`), and
`create` sends that bid as `price`. The id says everything a create needs and survives the bus
unchanged; a caller who wants a higher bid writes it into the id. A provider built with
`interruptible=True` (`VASTAI_INTERRUPTIBLE=1`) searches bid pricing (`"type": "bid"`) and names
each offer with the price vast.ai quotes for it; by default it searches on-demand offers, so
nothing is rented interruptibly unless asked for. The bid stays a `Decimal` up to the JSON body,
the one place it becomes a number. `metadata["rental"]` says which kind an offer is. `tier`
and `vendor` are the GPU catalogue's words, not vast.ai's: left empty for the fleet to fill.

Units. `gpu_ram` is MB of one GPU: `vram_gb` is it / 1024, rounded half up (24564 -> 24), and
the server-side filter asks for everything that rounds up to `min_vram_gb`. `dph_total` is $ per
hour for the whole offer: read exactly as written in the JSON (floats parse to `Decimal`) and
turned into integer micros without float arithmetic. `geolocation` ("Texas, US", "Germany,
DE") becomes a location in the simulator's form ("US-TX", "EU-DE", "AP-SG"; else the country
code and region, "CA-Quebec"), and a location filter goes to vast.ai as a country filter
(`"EU"` as `{"in": [...European codes]}`). A GPU-model filter is a substring, which vast.ai's
exact `gpu_name` cannot express: it is applied here, on a wider page of the cheapest offers.

Launch. `runtype` is `args`, so the image's own entrypoint (an OpenAI-compatible server, vLLM's
by default) runs unchanged; no `onstart` script is needed. Container ports travel the way
vast.ai expects them, as `"-p 8000:8000": "1"` entries in `env`, first of all (so the first
port is the first `-p` the instance reports back in `extra_env`). Environment names must be
plain identifiers: vast.ai reads a name that begins with `-` as a docker option.

Statuses (`actual_status`, `intended_status`, `cur_state`, `status_msg`), in this order:
- `cur_state` `unloaded` (released on destroy): gone, None.
- interruptible (`is_bid`) and `stopped` in any of the three: STOPPED, outbid.
- `actual_status` exited / offline / unknown (no heartbeat): EXITED, with `status_msg`.
- `stopped` or `frozen` in any of the three: STOPPED (by the account or the host).
- `actual_status` running: RUNNING; anything else (null, created, loading, scheduling,
  rebooting, a word not known yet): CREATING, left to the provisioner's deadlines.
The endpoint is `http://{public_ipaddr}:{HostPort}` of the first requested container port
(`ports["8000/tcp"][0]["HostPort"]`), once vast.ai reports both.

Errors. 429 and its backoff, timeouts and 5xx are `ApiClient`'s. A refused key (401) or a
forbidden call (403: scope or credit) is FailedPrecondition: retrying will not fix it. An offer
answered with 404/410 or `no_such_ask` ("... is no longer available") is FailedPrecondition
naming the offer. Any other refusal is FailedPrecondition with vast.ai's own `msg`. Every
message is scrubbed of the API key, even where vast.ai's own text would repeat it.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import httpx

from schemas.errors import (
    ConfigError,
    FailedPrecondition,
    GpuproxyError,
    InvalidArgument,
    Unavailable,
)
from schemas.gpus import DEFAULT_API_PORT, GpuOffer, LaunchSpec, OfferQuery, ProviderName
from workers.provisioner.providers.base import Machine, MachineStatus, Provider
from workers.provisioner.providers.http import ApiClient

DEFAULT_BASE_URL = "https://console.vast.ai/api/v0"
DEFAULT_IMAGE = "vllm/vllm-openai:latest"
"""Serves the OpenAI-compatible API on port 8000 from its own entrypoint."""
DEFAULT_DISK_GB = 32
"""Room for a vLLM image and a small model; vast.ai's own default (8-10 GB) is not."""
DEFAULT_LIMIT = 100
WIDE_PAGE = 1000
"""Offers asked for when a filter can only be applied here (the GPU model substring)."""

ON_DEMAND = "on-demand"
INTERRUPTIBLE = "interruptible"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

MICROS = Decimal(1_000_000)
MB_PER_GB = Decimal(1024)
HALF_GB = Decimal("0.5")

NAME = "vast.ai"
_OFFER_ID = re.compile(r"(?P<ask>[0-9]+)(?::bid=(?P<bid>[0-9]+(?:\.[0-9]+)?))?")
_INSTANCE_ID = re.compile(r"[0-9]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PORT_OPTION = re.compile(r"-p\s+(?:[0-9]+:)?(?P<port>[0-9]+)(?:/tcp)?")
_TAKEN = ("no_such_ask", "not available", "no longer available")
_GONE = ("no_such_instance", "no such instance", "not found")
_METADATA = {
    "reliability": "reliability2",
    "inet_down": "inet_down",
    "inet_up": "inet_up",
    "cpu_cores": "cpu_cores",
    "cpu_ram": "cpu_ram",
    "disk_space": "disk_space",
    "geolocation": "geolocation",
    "machine_id": "machine_id",
    "min_bid": "min_bid",
    "cuda_max_good": "cuda_max_good",
}
"""GpuOffer.metadata key -> vast.ai offer field."""
# The tables below are kept dense as split strings (SIM905): one item a line would run to pages.
_CONTINENTS = {
    "EU": frozenset(
        (  # noqa: SIM905
            "AT BE BG CH CY CZ DE DK EE ES FI FR GB GR HR HU IE IS IT LI LT LU LV MT NL NO "
            "PL PT RO RS SE SI SK UA"
        ).split()
    ),
    "AP": frozenset("AU CN HK ID IN JP KR MY NZ PH SG TH TW VN".split()),  # noqa: SIM905
}
"""Countries listed under a region prefix, as the simulator's "EU-DE" and "AP-SG" are."""
_US_STATES = dict(
    pair.split(":")
    for pair in (  # noqa: SIM905
        "alabama:AL alaska:AK arizona:AZ arkansas:AR california:CA colorado:CO connecticut:CT "
        "delaware:DE florida:FL georgia:GA hawaii:HI idaho:ID illinois:IL indiana:IN iowa:IA "
        "kansas:KS kentucky:KY louisiana:LA maine:ME maryland:MD massachusetts:MA michigan:MI "
        "minnesota:MN mississippi:MS missouri:MO montana:MT nebraska:NE nevada:NV "
        "new_hampshire:NH new_jersey:NJ new_mexico:NM new_york:NY north_carolina:NC "
        "north_dakota:ND ohio:OH oklahoma:OK oregon:OR pennsylvania:PA rhode_island:RI "
        "south_carolina:SC south_dakota:SD tennessee:TN texas:TX utah:UT vermont:VT "
        "virginia:VA washington:WA west_virginia:WV wisconsin:WI wyoming:WY "
        "district_of_columbia:DC"
    ).split()
)


class VastAiProvider(Provider):
    name = ProviderName.VASTAI

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 15.0,
        max_attempts: int = 5,
        backoff: float = 0.5,
        interruptible: bool = False,
    ) -> None:
        self._key = api_key
        self._base_url = base_url
        self._interruptible = interruptible
        self._api = ApiClient(
            NAME,
            base_url,
            {"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=timeout,
            max_attempts=max_attempts,
            backoff=backoff,
        )

    def __repr__(self) -> str:
        return f"VastAiProvider(base_url={self._base_url!r})"

    async def search(self, query: OfferQuery) -> list[GpuOffer]:
        limit = query.limit or DEFAULT_LIMIT
        page = max(limit, WIDE_PAGE) if query.gpu_model else limit
        body = search_body(query, interruptible=self._interruptible, page=page)
        answer = self._read(await self._send("POST", "/bundles/", json=body), "search offers")
        rows = answer.get("offers")
        offers = [
            offer
            for row in (rows if isinstance(rows, list) else [])
            if isinstance(row, dict) and (offer := offer_of(row, self._interruptible)) is not None
        ]
        if query.gpu_model:
            wanted = query.gpu_model.strip().casefold()
            offers = [o for o in offers if wanted in o.gpu_model.casefold()][:limit]
        return offers

    async def create(self, offer_id: str, spec: LaunchSpec, *, label: str) -> str:
        ask, bid = parse_offer_id(offer_id)
        body = launch_body(spec, label=label, bid=bid)
        response = await self._send("PUT", f"/asks/{ask}/", json=body)
        if _says(response, _TAKEN, statuses=(404, 410)):
            raise FailedPrecondition(
                f"{NAME} offer {offer_id} is no longer available (another renter took it or "
                f"its host withdrew it){self._reason(response)}"
            )
        answer = self._read(response, f"rent offer {offer_id}")
        contract = answer.get("new_contract")
        if isinstance(contract, bool) or not isinstance(contract, int):
            # Rented, perhaps: the provisioner finds the machine by its label before retrying.
            raise Unavailable(f"{NAME} rented offer {offer_id} but named no instance id")
        return str(contract)

    async def get(self, provider_id: str) -> Machine | None:
        instance = instance_id(provider_id)
        response = await self._send("GET", f"/instances/{instance}/", params={"owner": "me"})
        if _says(response, _GONE, statuses=(404, 410)):
            return None
        row = self._read(response, f"show instance {instance}").get("instances")
        return machine_of(row) if isinstance(row, dict) and row else None

    async def list(self) -> list[Machine]:
        response = await self._send("GET", "/instances", params={"owner": "me"})
        rows = self._read(response, "list instances").get("instances")
        return [
            machine
            for row in (rows if isinstance(rows, list) else [])
            if isinstance(row, dict) and (machine := machine_of(row)) is not None
        ]

    async def destroy(self, provider_id: str) -> None:
        instance = instance_id(provider_id)
        response = await self._send("DELETE", f"/instances/{instance}/", json={})
        if _says(response, _GONE, statuses=(404, 410)):
            return
        self._read(response, f"destroy instance {instance}")

    async def close(self) -> None:
        await self._api.close()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        try:
            return await self._api.request(method, path, json=json, params=params)
        except GpuproxyError as exc:
            if self._key and self._key in exc.message:
                raise type(exc)(self._scrub(exc.message), field=exc.field) from None
            raise

    def _read(self, response: httpx.Response, doing: str) -> dict[str, Any]:
        """The JSON object of a successful answer; the error it means otherwise."""
        body = _json(response)
        ok = response.is_success and isinstance(body, dict) and body.get("success") is not False
        if ok and isinstance(body, dict):
            return body
        if response.is_success and not isinstance(body, dict):
            raise Unavailable(f"{NAME} answered {doing} with a body that is not a JSON object")
        raise self._refusal(response, doing)

    def _refusal(self, response: httpx.Response, doing: str) -> GpuproxyError:
        status = response.status_code
        reason = self._reason(response)
        match status:
            case 401:
                return FailedPrecondition(
                    f"{NAME} refused the API key (401) to {doing}{reason}; check VASTAI_API_KEY"
                )
            case 403:
                return FailedPrecondition(
                    f"{NAME} forbids this API key to {doing} (403: key scope or account "
                    f"credit){reason}"
                )
            case _ if 300 <= status < 400:
                return Unavailable(f"{NAME} answered {doing} with a redirect ({status})")
            case _:
                return FailedPrecondition(f"{NAME} refused to {doing} ({status}){reason}")

    def _reason(self, response: httpx.Response) -> str:
        """vast.ai's own short words about a refusal, never the key."""
        body = _json(response)
        text = ""
        if isinstance(body, dict):
            for key in ("msg", "message", "detail", "error"):
                value = body.get(key)
                if isinstance(value, str) and value.strip():
                    text = value
                    break
        elif body is None and "<" not in response.text:
            text = response.text.strip().splitlines()[0] if response.text.strip() else ""
        return f": {self._scrub(text)[:300]}" if text else ""

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text


def from_env(env: Mapping[str, str]) -> VastAiProvider | None:
    """The provider `VASTAI_API_KEY` configures (at `VASTAI_API_URL`, when set; searching bid
    prices when `VASTAI_INTERRUPTIBLE` is true); None without a key: a provider without a key
    is simply not offered."""
    key = env.get("VASTAI_API_KEY", "").strip()
    if not key:
        return None
    flag = env.get("VASTAI_INTERRUPTIBLE", "").strip().lower()
    if flag not in _TRUE | _FALSE:
        raise ConfigError(
            f"VASTAI_INTERRUPTIBLE must be true or false, not {flag[:20]!r}",
            field="VASTAI_INTERRUPTIBLE",
        )
    return VastAiProvider(
        key,
        base_url=env.get("VASTAI_API_URL", "").strip() or DEFAULT_BASE_URL,
        interruptible=flag in _TRUE,
    )


def search_body(query: OfferQuery, *, interruptible: bool, page: int) -> dict[str, Any]:
    """The `/bundles/` query: every filter of `query` vast.ai can apply itself."""
    body: dict[str, Any] = {
        "verified": {"eq": True},
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "order": [["dph_total", "asc"]],
        "type": "bid" if interruptible else ON_DEMAND,
        "limit": page,
    }
    if query.min_vram_gb > 0:
        body["gpu_ram"] = {"gte": int((query.min_vram_gb - HALF_GB) * MB_PER_GB)}
    if query.max_price_micros > 0:
        # A JSON number at the wire; the comparison happens at vast.ai.
        body["dph_total"] = {"lte": float(Decimal(query.max_price_micros) / MICROS)}
    if query.min_gpus > 0:
        body["num_gpus"] = {"gte": query.min_gpus}
    countries = countries_of(query.location)
    if countries:
        body["geolocation"] = {"eq": countries[0]} if len(countries) == 1 else {"in": countries}
    return body


def countries_of(location: str) -> list[str]:
    """The country codes a location prefix can match ("EU-DE": DE, "EU": Europe's, "US-TX":
    US); none when it names no whole country or region ("E", "U")."""
    head, _, rest = location.strip().upper().partition("-")
    if head in _CONTINENTS:
        members = _CONTINENTS[head]
        return [rest] if rest in members else sorted(members)
    return [head] if len(head) == 2 and head.isalpha() else []


def offer_of(row: Mapping[str, Any], interruptible: bool) -> GpuOffer | None:
    """One `/bundles/` offer as a GpuOffer; None for a row missing what an offer needs."""
    ask = row.get("id")
    gpu = row.get("gpu_name")
    price = _decimal(row.get("dph_total"))
    if isinstance(ask, bool) or not isinstance(ask, int) or not gpu or price is None or price < 0:
        return None
    metadata = {
        key: _text(row[field]) for key, field in _METADATA.items() if row.get(field) is not None
    }
    return GpuOffer(
        provider=ProviderName.VASTAI,
        offer_id=f"{ask}:bid={_plain(price)}" if interruptible else str(ask),
        gpu_model=str(gpu),
        num_gpus=_whole(row.get("num_gpus")) or 1,
        vram_gb=vram_gb(row.get("gpu_ram")),
        price_per_hour_micros=micros(price),
        location=location_of(row.get("geolocation")),
        metadata={**metadata, "rental": INTERRUPTIBLE if interruptible else ON_DEMAND},
    )


def parse_offer_id(offer_id: str) -> tuple[int, Decimal | None]:
    """The ask id and, for an interruptible offer, the bid in $ per hour."""
    match = _OFFER_ID.fullmatch(offer_id.strip())
    if match is None:
        raise InvalidArgument(
            f"{offer_id[:64]!r} is not a {NAME} offer id (`<ask id>` or "
            "`<ask id>:bid=<$ per hour>`)",
            field="offer_id",
        )
    bid = Decimal(match["bid"]) if match["bid"] else None
    if bid is not None and bid <= 0:
        raise InvalidArgument(f"the bid in offer {offer_id} must be above 0", field="offer_id")
    return int(match["ask"]), bid


def launch_body(spec: LaunchSpec, *, label: str, bid: Decimal | None) -> dict[str, Any]:
    """The `/asks/{id}/` body that starts `spec` under `label`."""
    ports = spec.ports or (DEFAULT_API_PORT,)
    for port in ports:
        if not 0 < port < 65536:
            raise InvalidArgument(f"container port {port} is out of range", field="ports")
    env = {f"-p {port}:{port}": "1" for port in ports}
    for key, value in spec.env.items():
        if not _ENV_NAME.fullmatch(key):
            raise InvalidArgument(
                f"environment variable name {key[:64]!r} is not a plain identifier "
                f"({NAME} reads names that begin with '-' as docker options)",
                field="env",
            )
        env[key] = value
    body: dict[str, Any] = {
        "client_id": "me",
        "image": spec.image or DEFAULT_IMAGE,
        "env": env,
        "disk": spec.disk_gb or DEFAULT_DISK_GB,
        "label": label,
        "runtype": "args",
    }
    if bid is not None:
        body["price"] = float(bid)  # a JSON number at the wire; never computed with
    return body


def instance_id(provider_id: str) -> int:
    if not _INSTANCE_ID.fullmatch(provider_id.strip()):
        raise InvalidArgument(
            f"{provider_id[:64]!r} is not a {NAME} instance id", field="provider_id"
        )
    return int(provider_id)


def machine_of(row: Mapping[str, Any]) -> Machine | None:
    """One `/instances` row as a Machine; None for one vast.ai has released."""
    folded = status_of(row)
    if folded is None:
        return None
    status, message = folded
    label = row.get("label")
    return Machine(
        provider_id=str(row.get("id", "")),
        label=label if isinstance(label, str) else "",
        status=status,
        message=message,
        endpoint=endpoint_of(row),
        interruptible=row.get("is_bid") is True,
    )


def status_of(row: Mapping[str, Any]) -> tuple[MachineStatus, str] | None:
    actual, intended, state = (
        str(row.get(field) or "").strip().lower()
        for field in ("actual_status", "intended_status", "cur_state")
    )
    words = (actual, intended, state)
    said = str(row.get("status_msg") or "").strip()
    if state == "unloaded":
        return None
    if row.get("is_bid") is True and "stopped" in words:
        return MachineStatus.STOPPED, _joined(
            "outbid: a higher bid took the machine of this interruptible instance", said
        )
    if actual in ("exited", "offline", "unknown"):
        default = {
            "exited": "its container exited",
            "offline": "its host went offline",
            "unknown": "no recent heartbeat from its host",
        }[actual]
        return MachineStatus.EXITED, said or default
    if "stopped" in words or "frozen" in words:
        return MachineStatus.STOPPED, _joined("stopped by the account or its host", said)
    if actual == "running":
        return MachineStatus.RUNNING, said
    return MachineStatus.CREATING, said or actual or "being scheduled"


def endpoint_of(row: Mapping[str, Any]) -> str:
    """`http://host:port` of the first container port the instance was started with."""
    raw = str(row.get("public_ipaddr") or "").strip()
    ports = row.get("ports")
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return ""
    if not isinstance(ports, dict):
        return ""
    bindings = ports.get(f"{api_port_of(row)}/tcp")
    if not isinstance(bindings, list) or not bindings or not isinstance(bindings[0], dict):
        return ""
    host_port = _whole(bindings[0].get("HostPort"))
    if host_port is None or not 0 < host_port < 65536:
        return ""
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{host_port}"


def api_port_of(row: Mapping[str, Any]) -> int:
    """The first `-p` container port in the instance's `extra_env` (8000 without one)."""
    extra = row.get("extra_env")
    for item in extra if isinstance(extra, list) else []:
        if isinstance(item, list) and item and isinstance(item[0], str):
            match = _PORT_OPTION.fullmatch(item[0].strip())
            if match:
                return int(match["port"])
    return DEFAULT_API_PORT


def micros(dollars: Decimal) -> int:
    return int((dollars * MICROS).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def vram_gb(megabytes: Any) -> int:
    amount = _decimal(megabytes)
    if amount is None or amount <= 0:
        return 0
    return int((amount / MB_PER_GB).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def location_of(geolocation: Any) -> str:
    """ "Texas, US" -> "US-TX"; "Germany, DE" -> "EU-DE"; "Quebec, CA" -> "CA-Quebec"."""
    text = str(geolocation or "").strip()
    region, _, country = text.rpartition(",")
    country, region = country.strip().upper(), region.strip()
    if len(country) != 2 or not country.isalpha():
        return text
    for continent, members in _CONTINENTS.items():
        if country in members:
            return f"{continent}-{country}"
    if country == "US" and region:
        region = _US_STATES.get("_".join(region.lower().split()), region)
    return f"{country}-{region}" if region else country


def _says(response: httpx.Response, words: tuple[str, ...], *, statuses: tuple[int, ...]) -> bool:
    """Whether a refusal is one of a kind: by its status, or by vast.ai's words in its body."""
    if response.status_code in statuses:
        return True
    body = _json(response)
    refused = not response.is_success or (isinstance(body, dict) and body.get("success") is False)
    if not refused or response.status_code in (401, 403):
        return False
    text = response.text.lower()
    return any(word in text for word in words)


def _json(response: httpx.Response) -> Any:
    """The body with every JSON number that has a fraction as a Decimal; None if not JSON."""
    try:
        return json.loads(response.content, parse_float=Decimal)
    except ValueError:
        return None


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _whole(value: Any) -> int | None:
    number = _decimal(value)
    if number is None or number != number.to_integral_value():
        return None
    return int(number)


def _plain(number: Decimal) -> str:
    """A Decimal without exponent or trailing zeros: 0.150 -> "0.15", 1E+1 -> "10"."""
    return format(number.normalize(), "f")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return _plain(value)
    return str(value)


def _joined(ours: str, theirs: str) -> str:
    return f"{ours} ({theirs})" if theirs else ours
