"""Model prices: read from decimal text into integer micros, merged over the defaults, and the
cost of a request's tokens rounded once, half up, with integer arithmetic only."""

from __future__ import annotations

import json
import random
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from schemas.prices import (
    DEFAULT_PRICES,
    PRICES_SETTING,
    InvalidPrices,
    ModelPrice,
    PriceTable,
    cost_micros,
    parse_prices,
)
from simulator.upstream import DEFAULT_MODEL

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def refused(raw: str) -> InvalidPrices:
    with pytest.raises(InvalidPrices) as caught:
        parse_prices(raw)
    return caught.value


def shown(error: ConfigError) -> str:
    """The error as the command line prints it (`gpuproxy: <field>: <message>`)."""
    return f"{error.field}: {error.message}"


# Reading the setting


def test_inline_json_gives_micros_per_million_tokens() -> None:
    table = parse_prices(
        json.dumps({LLAMA: {"input": "0.20", "cached_input": "0.10", "output": "0.60"}})
    )

    assert table.get(LLAMA) == ModelPrice(input=200_000, cached_input=100_000, output=600_000)


def test_cached_input_defaults_to_the_input_price() -> None:
    table = parse_prices(json.dumps({LLAMA: {"input": "1.5", "output": "2"}}))

    assert table.get(LLAMA) == ModelPrice(input=1_500_000, cached_input=1_500_000, output=2_000_000)


def test_six_decimal_places_and_trailing_zeros_beyond_them_are_exact() -> None:
    table = parse_prices(
        json.dumps({LLAMA: {"input": "0.000001", "output": "123.4560000000", "cached_input": "0"}})
    )

    assert table.get(LLAMA) == ModelPrice(input=1, cached_input=0, output=123_456_000)


def test_a_toml_file_of_one_table_per_model_is_read(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        f'["{LLAMA}"]\ninput = "0.05"\noutput = "0.25"\n\n'
        '["qwen2.5-7b"]\ninput = "0.10"\ncached_input = "0.025"\noutput = "0.30"\n'
    )

    table = parse_prices(f"  {path}  ")

    assert table.get(LLAMA) == ModelPrice(input=50_000, cached_input=50_000, output=250_000)
    assert table.get("qwen2.5-7b") == ModelPrice(input=100_000, cached_input=25_000, output=300_000)


def test_an_empty_setting_gives_the_defaults_which_price_the_simulated_model() -> None:
    assert parse_prices("") == DEFAULT_PRICES
    assert parse_prices("   ") == DEFAULT_PRICES
    assert DEFAULT_PRICES.get(DEFAULT_MODEL) == ModelPrice(
        input=200_000, cached_input=100_000, output=600_000
    )


def test_a_configured_table_is_merged_over_the_defaults_entry_by_entry() -> None:
    added = parse_prices(json.dumps({LLAMA: {"input": "1", "output": "2"}}))
    assert added.get(LLAMA) is not None
    assert added.get(DEFAULT_MODEL) == DEFAULT_PRICES.get(DEFAULT_MODEL)

    # Naming a default model replaces its whole entry: its cached price follows the new input.
    replaced = parse_prices(json.dumps({DEFAULT_MODEL: {"input": "3", "output": "4"}}))
    assert replaced.get(DEFAULT_MODEL) == ModelPrice(
        input=3_000_000, cached_input=3_000_000, output=4_000_000
    )


def test_a_model_without_a_price_has_none() -> None:
    assert parse_prices("").get("gpt-5") is None
    assert PriceTable().get(DEFAULT_MODEL) is None


# Refusals, each naming the model and the field


def test_a_json_number_is_refused_with_advice_to_quote_it() -> None:
    error = refused(json.dumps({"x": {"input": "0.20", "output": 0.6}}))

    assert isinstance(error, ConfigError)
    assert isinstance(error, ValueError)
    assert error.field == PRICES_SETTING
    assert (error.model, error.key) == ("x", "output")
    assert shown(error).startswith('GPUPROXY_PRICES: model "x" field "output": ')
    assert 'in quotes, e.g. "0.20"' in error.message
    assert "lose cents" in error.message


def test_a_whole_number_is_refused_too_so_the_rule_is_simple() -> None:
    error = refused(json.dumps({"x": {"input": 1, "output": "1"}}))

    assert (error.model, error.key) == ("x", "input")
    assert "in quotes" in error.message


def test_a_toml_number_is_refused_with_advice_to_quote_it(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('["x"]\ninput = "0.20"\ncached_input = 0.1\noutput = "0.60"\n')

    error = refused(str(path))

    assert shown(error).startswith('GPUPROXY_PRICES: model "x" field "cached_input": ')
    assert "in quotes" in error.message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-0.01", "must not be negative"),
        ("0.0000001", "more than 6 decimal places"),
        ("1.1234567", "more than 6 decimal places"),
        ("cheap", "decimal number"),
        ("", "decimal number"),
        ("NaN", "decimal number"),
        ("Infinity", "decimal number"),
        ("1000000.000001", "at most 1000000"),
        (None, "in quotes"),
        (["0.20"], "in quotes"),
        (True, "in quotes"),
    ],
)
def test_a_price_that_is_not_a_micro_exact_amount_is_refused(value: object, reason: str) -> None:
    error = refused(json.dumps({"x": {"input": "0.20", "output": value}}))

    assert shown(error).startswith('GPUPROXY_PRICES: model "x" field "output": ')
    assert reason in error.message


def test_an_unknown_field_is_refused_naming_it_and_the_known_ones() -> None:
    error = refused(json.dumps({"x": {"input": "1", "output": "1", "ouput": "1"}}))

    assert shown(error) == (
        'GPUPROXY_PRICES: model "x" field "ouput": unknown; known: input, cached_input, output'
    )


def test_a_missing_price_is_refused_naming_it() -> None:
    error = refused(json.dumps({"x": {"input": "1"}}))

    assert shown(error) == 'GPUPROXY_PRICES: model "x" field "output": is missing'


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps([{"input": "1", "output": "1"}]),
        json.dumps({"x": "0.20"}),
        json.dumps({"x": ["0.20", "0.60"]}),
    ],
)
def test_prices_that_are_not_objects_are_refused(raw: str) -> None:
    error = refused(raw)

    assert error.field == PRICES_SETTING
    assert "must be an object" in error.message


def test_a_model_entry_that_is_not_an_object_names_the_model() -> None:
    error = refused(json.dumps({"x": "0.20"}))

    assert shown(error).startswith('GPUPROXY_PRICES: model "x": must be an object')


def test_an_empty_model_name_is_refused() -> None:
    error = refused(json.dumps({" ": {"input": "1", "output": "1"}}))

    assert "must not be empty" in error.message


def test_json_that_does_not_parse_is_refused() -> None:
    error = refused('{"x": {"input": "1", ')

    assert error.message.startswith("is not valid JSON")


def test_a_missing_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"

    error = refused(str(path))

    assert str(path) in error.message
    assert "cannot read" in error.message


def test_a_file_that_is_not_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text("[x\ninput = ")

    error = refused(str(path))

    assert "is not valid TOML" in error.message


# The cost of a request


def test_cost_rounds_half_a_micro_up_and_less_down() -> None:
    one_micro = ModelPrice(input=1, cached_input=1, output=1)

    def cost(tokens: int) -> int:
        return cost_micros(one_micro, input_tokens=tokens, cached_tokens=0, output_tokens=0)

    assert cost(499_999) == 0
    assert cost(500_000) == 1
    assert cost(1_499_999) == 1
    # Half up, not to even: 1.5 and 2.5 both go up.
    assert cost(1_500_000) == 2
    assert cost(2_500_000) == 3


def test_cached_tokens_are_part_of_the_input_and_billed_at_the_cached_price() -> None:
    price = ModelPrice(input=200_000, cached_input=100_000, output=600_000)

    # 600 fresh input tokens, 400 cached, 500 output: 120 000 000 + 40 000 000 + 300 000 000.
    assert cost_micros(price, input_tokens=1000, cached_tokens=400, output_tokens=500) == 460


def test_the_parts_are_summed_before_the_one_rounding() -> None:
    # Each part alone is 0.4 micro and would round to nothing; together they are 1.2.
    price = ModelPrice(input=400_000, cached_input=400_000, output=400_000)

    assert cost_micros(price, input_tokens=2, cached_tokens=1, output_tokens=1) == 1


def test_large_token_counts_cost_exactly_what_decimal_arithmetic_says() -> None:
    rng = random.Random(20240611)
    for _ in range(500):
        price = ModelPrice(
            input=rng.randrange(0, 10**12),
            cached_input=rng.randrange(0, 10**12),
            output=rng.randrange(0, 10**12),
        )
        input_tokens = rng.randrange(0, 10**15)
        cached_tokens = rng.randrange(0, input_tokens + 1)
        output_tokens = rng.randrange(0, 10**15)
        with localcontext(prec=100):
            exact = (
                Decimal(input_tokens - cached_tokens) * price.input
                + Decimal(cached_tokens) * price.cached_input
                + Decimal(output_tokens) * price.output
            ).scaleb(-6)
            expected = int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))

        assert (
            cost_micros(
                price,
                input_tokens=input_tokens,
                cached_tokens=cached_tokens,
                output_tokens=output_tokens,
            )
            == expected
        )


def test_impossible_token_counts_are_refused() -> None:
    price = DEFAULT_PRICES.models[DEFAULT_MODEL]

    with pytest.raises(ValueError, match="part of the input"):
        cost_micros(price, input_tokens=1, cached_tokens=2, output_tokens=0)
    with pytest.raises(ValueError, match="negative"):
        cost_micros(price, input_tokens=1, cached_tokens=0, output_tokens=-1)
