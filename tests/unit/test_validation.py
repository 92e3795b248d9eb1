"""What a client sends is checked before anything is published, and each refusal names its field."""

from __future__ import annotations

import pytest

from gateway import validation
from gateway.http_app import PingBody
from gateway.http_io import decode as _decode
from schemas.commands import MAX_PING_DELAY_MS
from schemas.errors import InvalidArgument
from schemas.subjects import WorkerKind

KEY_FIELD = "Idempotency-Key"


@pytest.mark.parametrize("key", ["order-42", "a", "A_b-9", "x" * 64])
def test_a_valid_idempotency_key_gives_the_same_command_id_for_the_same_caller(key: str) -> None:
    first = validation.command_id(key, field=KEY_FIELD, owner="ada")

    assert validation.command_id(key, field=KEY_FIELD, owner="ada") == first
    assert validation.command_id(key, field=KEY_FIELD, owner="bob") != first
    assert len(first) <= 64


@pytest.mark.parametrize("key", [None, ""])
def test_without_an_idempotency_key_each_command_gets_a_fresh_id(key: str | None) -> None:
    first = validation.command_id(key, field=KEY_FIELD, owner="ada")
    second = validation.command_id(key, field=KEY_FIELD, owner="ada")

    assert first != second


@pytest.mark.parametrize(
    "key",
    [
        "x" * 65,
        "   ",
        "\t",
        "order.42",
        "orders.*",
        "orders.>",
        "*",
        ">",
        "order 42",
        " order-42",
        "order-42 ",
        "ordre-é",
    ],
)
def test_an_idempotency_key_that_is_not_one_subject_token_is_refused(key: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.command_id(key, field=KEY_FIELD, owner="ada")

    assert caught.value.field == KEY_FIELD


def test_an_idempotency_key_ending_in_a_newline_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.command_id("order-42\n", field=KEY_FIELD, owner="ada")

    assert caught.value.field == KEY_FIELD


def test_the_refusal_names_the_field_it_was_given() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.command_id("a.b", field="idempotency_key", owner="ada")

    assert caught.value.field == "idempotency_key"


def test_no_worker_kind_means_the_provisioner() -> None:
    assert validation.worker_kind("") is WorkerKind.PROVISIONER


@pytest.mark.parametrize("kind", list(WorkerKind))
def test_every_worker_kind_is_accepted_by_name(kind: WorkerKind) -> None:
    assert validation.worker_kind(kind.value) is kind


@pytest.mark.parametrize("value", ["gpu", "Proxy", "provisioner ", "billing.x"])
def test_an_unknown_worker_kind_names_the_field_and_lists_the_kinds(value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.worker_kind(value)

    assert caught.value.field == "worker_kind"
    assert all(kind.value in caught.value.message for kind in WorkerKind)


def test_an_unknown_worker_kind_names_the_field_it_was_given() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.worker_kind("gpu", field="kind")

    assert caught.value.field == "kind"


@pytest.mark.parametrize("delay_ms", [0, 1, MAX_PING_DELAY_MS])
def test_a_ping_delay_in_range_is_kept(delay_ms: int) -> None:
    assert validation.ping_delay(delay_ms) == delay_ms


@pytest.mark.parametrize("delay_ms", [-1, MAX_PING_DELAY_MS + 1])
def test_a_ping_delay_out_of_range_names_the_field(delay_ms: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.ping_delay(delay_ms)

    assert caught.value.field == "delay_ms"
    assert str(MAX_PING_DELAY_MS) in caught.value.message


def test_a_ping_message_of_1024_characters_is_kept() -> None:
    assert validation.ping_message("x" * 1024) == "x" * 1024


def test_a_ping_message_over_1024_characters_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.ping_message("x" * 1025)

    assert caught.value.field == "message"


def decode_error(raw: bytes) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        _decode(raw, PingBody)
    return caught.value


@pytest.mark.parametrize(
    "raw", [b'{"delay_ms": "soon"}', b'{"delay_ms": 1.5}', b'{"delay_ms": null}']
)
def test_a_body_field_of_the_wrong_type_is_named(raw: bytes) -> None:
    error = decode_error(raw)

    assert error.field == "delay_ms"
    assert "Expected `int`" in error.message
    assert "$" not in error.message


def test_a_message_of_the_wrong_type_is_named() -> None:
    assert decode_error(b'{"message": 42}').field == "message"


def test_an_unknown_body_field_is_refused_and_named() -> None:
    error = decode_error(b'{"message": "hi", "delay": 5}')

    assert error.field == "delay"
    assert "unknown field" in error.message


@pytest.mark.parametrize("raw", [b"not json", b'{"message": ', b"\xff\xfe"])
def test_a_body_that_is_not_json_names_the_body(raw: bytes) -> None:
    error = decode_error(raw)

    assert error.field == "body"


def test_a_json_body_that_is_not_an_object_is_refused() -> None:
    decode_error(b"[1, 2]")


def test_an_empty_body_takes_the_defaults() -> None:
    assert _decode(b"", PingBody) == PingBody()


def test_a_well_formed_body_is_decoded() -> None:
    body = _decode(b'{"message": "hi", "worker_kind": "proxy", "delay_ms": 10}', PingBody)

    assert body == PingBody(message="hi", worker_kind="proxy", delay_ms=10)
