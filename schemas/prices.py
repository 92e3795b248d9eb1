"""What inference costs: prices per model, and the cost of one request's tokens.

Prices come from `GPUPROXY_PRICES`, in currency units per million tokens, written as decimal
text ("0.20"), never as a number: a JSON or TOML number passes through binary floating point,
where 0.1 is not 0.1 and cents go missing. The setting is either

- inline JSON, recognised by its first character `{` (or `[`, to refuse it clearly):

      {"sim-llama-3-8b": {"input": "0.20", "cached_input": "0.10", "output": "0.60"}}

- or the path of a TOML file of the same shape, one top-level table per model (the name
  quoted when it holds a dot or a slash):

      ["sim-llama-3-8b"]
      input = "0.20"
      cached_input = "0.10"
      output = "0.60"

`input` and `output` are required; `cached_input`, the price of prompt tokens the machine had
cached, defaults to `input`. A price has at most 6 decimal places (a micro-unit is the
smallest amount money has here) and is at most `MAX_PRICE_UNITS`. The table given is merged
over `DEFAULT_PRICES` model by model: a model named replaces its default entry whole, every
other default stays. An empty setting means the defaults alone.

A model missing from the table has no price: `PriceTable.get` answers None and the caller
refuses to serve it, rather than serve it for free.

Money is integer micro-units (1 unit = 1_000_000 micros) from here on; `Decimal` only reads
the text.
"""

from __future__ import annotations

import json
import tomllib
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import msgspec

from schemas.errors import ConfigError

PRICES_SETTING = "GPUPROXY_PRICES"

MICROS = 1_000_000
"""Micro-units in one currency unit."""

TOKENS_PER_PRICE = 1_000_000
"""A price is for this many tokens."""

MAX_PRICE_UNITS = 1_000_000
"""The highest price accepted, in units per million tokens (one unit per token): anything
dearer is a slipped decimal point, not a price."""

PRICE_KEYS = ("input", "cached_input", "output")

Micros = Annotated[int, msgspec.Meta(ge=0)]


class ModelPrice(msgspec.Struct, frozen=True, kw_only=True):
    """The prices of one model, in micro-units per million tokens."""

    input: Micros
    """A prompt token the machine had to read."""
    cached_input: Micros
    """A prompt token the machine had cached (part of the input tokens)."""
    output: Micros
    """A generated token."""


class PriceTable(msgspec.Struct, frozen=True, kw_only=True):
    """Prices by model name."""

    models: dict[str, ModelPrice] = msgspec.field(default_factory=dict)

    def get(self, model: str) -> ModelPrice | None:
        """The model's prices; None when it has none (serve it, and it would be free)."""
        return self.models.get(model)

    def merged_over(self, base: PriceTable) -> PriceTable:
        """`base` with this table's models added or replaced, whole entries at a time."""
        return PriceTable(models={**base.models, **self.models})


DEFAULT_PRICES = PriceTable(
    models={
        # The model every sim machine serves (`simulator.upstream.DEFAULT_MODEL`); schemas
        # imports nothing of the project, so a test keeps the two names together.
        "sim-llama-3-8b": ModelPrice(input=200_000, cached_input=100_000, output=600_000),
    }
)
"""What a deployment charges with no `GPUPROXY_PRICES`: enough for the simulator to bill."""


class InvalidPrices(ConfigError):
    """`GPUPROXY_PRICES` is wrong; `model` and `key` name the entry at fault when one is."""

    def __init__(self, reason: str, *, model: str | None = None, key: str = "") -> None:
        where = ""
        if model is not None:
            where = f"model {_quoted(model)}"
            where += f" field {_quoted(key)}: " if key else ": "
        super().__init__(where + reason, field=PRICES_SETTING)
        self.model = model
        self.key = key


def parse_prices(raw: str) -> PriceTable:
    """The price table `GPUPROXY_PRICES` says, merged over the defaults; raises
    `InvalidPrices` naming the model and the field at fault."""
    text = raw.strip()
    if not text:
        return DEFAULT_PRICES
    document = _json_document(text) if text[0] in "{[" else _toml_document(Path(text))
    return PriceTable(models=_models(document)).merged_over(DEFAULT_PRICES)


def cost_micros(
    price: ModelPrice, *, input_tokens: int, cached_tokens: int, output_tokens: int
) -> int:
    """What one request's tokens cost, in micro-units; `cached_tokens` are part of
    `input_tokens` and billed at the cached price.

    The three products are summed exactly and rounded once, half up, to a whole micro. One
    rounding per request makes the cost a function of the token counts alone: a streamed and
    a whole answer to the same prompt cost the same, however the stream was cut into chunks,
    and no request is off by more than half a micro. Rounding each part, or each chunk,
    would let the same tokens cost a micro more or less depending on how they arrived.
    """
    if min(input_tokens, cached_tokens, output_tokens) < 0:
        raise ValueError("token counts must not be negative")
    if cached_tokens > input_tokens:
        raise ValueError("cached tokens are part of the input tokens: at most as many")
    total = (
        (input_tokens - cached_tokens) * price.input
        + cached_tokens * price.cached_input
        + output_tokens * price.output
    )
    return (total + TOKENS_PER_PRICE // 2) // TOKENS_PER_PRICE


def _quoted(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def _json_document(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidPrices(f"is not valid JSON: {exc}") from None


def _toml_document(path: Path) -> object:
    try:
        content = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InvalidPrices(
            f"cannot read the TOML file {path}: {reason} (inline JSON starts with '{{')"
        ) from None
    try:
        return tomllib.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidPrices(f"{path} is not valid TOML: {exc}") from None


def _models(document: object) -> dict[str, ModelPrice]:
    if not isinstance(document, dict):
        raise InvalidPrices(
            'must be an object of models, e.g. {"model": {"input": "0.20", "output": "0.60"}}'
        )
    return {_model_name(name): _model_price(name, entry) for name, entry in document.items()}


def _model_name(name: str) -> str:
    if not name.strip():
        raise InvalidPrices("a model name must not be empty", model=name)
    return name


def _model_price(model: str, entry: object) -> ModelPrice:
    if not isinstance(entry, dict):
        raise InvalidPrices(
            f"must be an object of prices with the keys {', '.join(PRICE_KEYS)}", model=model
        )
    for key in entry:
        if key not in PRICE_KEYS:
            raise InvalidPrices(f"unknown; known: {', '.join(PRICE_KEYS)}", model=model, key=key)
    for key in ("input", "output"):
        if key not in entry:
            raise InvalidPrices("is missing", model=model, key=key)
    input_micros = _price_micros(model, "input", entry["input"])
    cached = entry.get("cached_input")
    return ModelPrice(
        input=input_micros,
        cached_input=input_micros
        if cached is None
        else _price_micros(model, "cached_input", cached),
        output=_price_micros(model, "output", entry["output"]),
    )


def _price_micros(model: str, key: str, value: Any) -> int:
    """Units per million tokens, as decimal text, into micro-units per million tokens."""
    if isinstance(value, bool | int | float | Decimal):
        raise InvalidPrices(
            f'must be decimal text in quotes, e.g. "0.20", not the number {value!r}: a number '
            "passes through binary floating point and can lose cents",
            model=model,
            key=key,
        )
    if not isinstance(value, str):
        raise InvalidPrices('must be decimal text in quotes, e.g. "0.20"', model=model, key=key)
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite():
        raise InvalidPrices(
            f'must be a decimal number of units per million tokens, e.g. "0.20", not {value!r}',
            model=model,
            key=key,
        )
    if amount < 0:
        raise InvalidPrices(f"must not be negative, got {value!r}", model=model, key=key)
    if amount > MAX_PRICE_UNITS:
        raise InvalidPrices(
            f"must be at most {MAX_PRICE_UNITS} units per million tokens, got {value!r}",
            model=model,
            key=key,
        )
    if not _whole_micros(amount):
        raise InvalidPrices(
            f"has more than 6 decimal places ({value!r}); a micro-unit, 0.000001, is the "
            "smallest amount",
            model=model,
            key=key,
        )
    return int(amount * MICROS)


def _whole_micros(amount: Decimal) -> bool:
    """Whether `amount` is a whole number of micro-units, read from its digits (no context
    rounding): every digit past the sixth decimal place is a zero."""
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)
    past_micros = -6 - exponent
    return past_micros <= 0 or not any(digits[-past_micros:])
