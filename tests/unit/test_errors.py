"""Error codes: one status table, and errors that survive the trip over the bus unchanged."""

from __future__ import annotations

import grpc
import msgspec
import pytest

from gateway.errors import STATUS, grpc_status, http_answer
from schemas import errors
from schemas.errors import (
    ConfigError,
    ErrorCode,
    ErrorInfo,
    GpuproxyError,
    InvalidArgument,
    NotFound,
    Reject,
    ResourceExhausted,
    RetryLater,
    Unavailable,
    error_from_info,
)


def class_of(code: ErrorCode) -> type[GpuproxyError]:
    """The exception named after a code: INVALID_ARGUMENT -> InvalidArgument."""
    cls: object = getattr(errors, code.name.title().replace("_", ""))
    assert isinstance(cls, type)
    assert issubclass(cls, GpuproxyError)
    return cls


def every_subclass(cls: type[GpuproxyError]) -> list[type[GpuproxyError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *every_subclass(sub)]
    return found


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_has_a_row_in_the_status_table(code: ErrorCode) -> None:
    assert code in STATUS


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_maps_to_the_grpc_status_of_the_same_name(code: ErrorCode) -> None:
    grpc_code, http_status = STATUS[code]

    assert grpc_code is getattr(grpc.StatusCode, code.name)
    assert 400 <= http_status <= 599


def test_the_status_table_has_no_row_without_a_code() -> None:
    assert set(STATUS) == set(ErrorCode)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_has_an_exception_class(code: ErrorCode) -> None:
    assert class_of(code).code == code


@pytest.mark.parametrize("code", list(ErrorCode))
def test_an_error_rebuilt_from_its_info_is_the_same_class_message_and_field(
    code: ErrorCode,
) -> None:
    sent = class_of(code)("offer 42 is gone", field="offer_id")

    rebuilt = error_from_info(sent.to_info())

    assert type(rebuilt) is type(sent)
    assert (rebuilt.code, rebuilt.message, rebuilt.field) == (code, sent.message, sent.field)
    assert rebuilt.retriable == sent.retriable


@pytest.mark.parametrize(
    "cls",
    # The bus's own error classes; a module's refinement (with its own constructor) travels
    # as its base class's code, which this covers.
    [
        c
        for c in every_subclass(GpuproxyError)
        if c not in (Reject, RetryLater) and c.__module__ == errors.__name__
    ],
    ids=lambda c: c.__name__,
)
def test_every_error_class_survives_the_bus_as_its_code(cls: type[GpuproxyError]) -> None:
    sent = cls("bad value", field="delay_ms")

    info = msgspec.json.decode(msgspec.json.encode(sent.to_info()), type=ErrorInfo)
    rebuilt = error_from_info(info)

    assert type(rebuilt) is class_of(sent.code)
    assert isinstance(rebuilt, GpuproxyError)
    assert (rebuilt.code, rebuilt.message, rebuilt.field) == (sent.code, "bad value", "delay_ms")


def test_a_config_error_arrives_as_an_invalid_argument_naming_the_setting() -> None:
    rebuilt = error_from_info(ConfigError("must be a whole number", field="SERVER_PORT").to_info())

    assert type(rebuilt) is InvalidArgument
    assert rebuilt.field == "SERVER_PORT"


def test_retry_later_travels_as_a_retriable_unavailable() -> None:
    info = RetryLater("provider is busy", delay=2.5).to_info()

    assert info.code == ErrorCode.UNAVAILABLE
    assert info.retriable
    assert type(error_from_info(info)) is Unavailable


def test_to_info_carries_whether_the_caller_may_retry() -> None:
    assert ResourceExhausted("budget").to_info().retriable
    assert not InvalidArgument("bad").to_info().retriable


def test_grpc_status_puts_the_field_before_the_message() -> None:
    code, message = grpc_status(InvalidArgument("must be at most 60000", field="delay_ms"))

    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message == "delay_ms: must be at most 60000"


def test_grpc_status_without_a_field_is_the_message_alone() -> None:
    assert grpc_status(Unavailable("no worker answered")) == (
        grpc.StatusCode.UNAVAILABLE,
        "no worker answered",
    )


def test_an_http_answer_names_code_message_and_field() -> None:
    status, body = http_answer(InvalidArgument("must be at most 60000", field="delay_ms"))

    assert status == 400
    assert body == {
        "error": {
            "code": "invalid_argument",
            "message": "must be at most 60000",
            "field": "delay_ms",
        }
    }
    assert type(body["error"]["code"]) is str


def test_an_http_answer_without_a_field_has_no_field_key() -> None:
    status, body = http_answer(NotFound("no such reservation"))

    assert status == 404
    assert body == {"error": {"code": "not_found", "message": "no such reservation"}}


def test_an_http_answer_is_plain_json() -> None:
    _, body = http_answer(ResourceExhausted("spending limit reached", field="amount"))

    assert msgspec.json.decode(msgspec.json.encode(body)) == body


def test_reject_carries_the_wrapped_errors_code_message_and_field() -> None:
    wrapped = NotFound("no such offer", field="offer_id")

    rejected = Reject(wrapped)

    assert rejected.error is wrapped
    assert rejected.code == ErrorCode.NOT_FOUND
    assert (rejected.message, rejected.field) == ("no such offer", "offer_id")
    assert rejected.to_info().code == ErrorCode.NOT_FOUND
    assert http_answer(rejected)[0] == 404
    assert grpc_status(rejected)[0] is grpc.StatusCode.NOT_FOUND


def test_a_reject_does_not_change_the_code_of_other_rejects() -> None:
    Reject(NotFound("gone"))

    assert Reject(InvalidArgument("bad")).code == ErrorCode.INVALID_ARGUMENT
    assert Reject.code == ErrorCode.INTERNAL
