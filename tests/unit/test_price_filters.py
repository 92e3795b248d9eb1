"""A price filter's maximum is rounded down to a micro-unit, never refused for its decimals,
and never computed with floats."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.gpus.requests import MAX_PRICE_MICROS, FilterBody, max_price_micros
from schemas.errors import InvalidArgument


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        (0.1 * 3, 300_000),
        ("0.30000000000000004", 300_000),
        (0.3, 300_000),
        (2.675, 2_675_000),
        ("1.2345679", 1_234_567),
        ("1.9999999", 1_999_999),
        (Decimal("0.0000019"), 1),
        ("3", 3_000_000),
        (3, 3_000_000),
        ("0", 0),
        (" 1.25 ", 1_250_000),
    ],
)
def test_a_maximum_becomes_micros_rounded_down(value: str | float | Decimal, micros: int) -> None:
    assert max_price_micros(value, field="max_price") == micros


def test_the_shortest_text_of_a_double_is_what_counts() -> None:
    double = 0.3
    # Its exact binary value is 0.29999999999999998889...: rounding that down loses a micro.
    assert Decimal(double) < Decimal("0.3")
    assert max_price_micros(double, field="max_price") == 300_000


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.0000001", "at least 0.000001"),
        (1e-9, "at least 0.000001"),
        ("-1", "negative"),
        (-0.5, "negative"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        ("Infinity", "finite"),
        ("cheap", "decimal number"),
        (str(MAX_PRICE_MICROS), "at most"),
        ("1e30", "at most"),
    ],
)
def test_a_maximum_that_means_nothing_is_refused_naming_the_field(
    value: str | float, message: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        max_price_micros(value, field="filters.max_price")
    assert refused.value.field == "filters.max_price"
    assert message in refused.value.message


def test_a_filter_body_rounds_its_maximum_too() -> None:
    query = FilterBody(max_price=0.1 * 3).checked("filters.")
    assert query.max_price_micros == 300_000
