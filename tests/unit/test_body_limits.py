"""One setting bounds both front doors: GPUPROXY_MAX_BODY_BYTES, and what too large answers."""

from __future__ import annotations

import grpc
import pytest

from gateway.errors import grpc_status, http_answer
from gateway.http_io import too_large
from gpuproxy.settings import load
from schemas.errors import ConfigError, ErrorCode, PayloadTooLarge


def test_the_body_limit_is_sixteen_mebibytes_unless_set() -> None:
    assert load({}).max_body_bytes == 16 * 1024 * 1024
    assert load({"GPUPROXY_MAX_BODY_BYTES": "1048576"}).max_body_bytes == 1024 * 1024


@pytest.mark.parametrize("value", ["1023", str(64 * 1024 * 1024 + 1), "16MiB"])
def test_a_body_limit_outside_what_nats_can_carry_is_refused_naming_the_setting(
    value: str,
) -> None:
    with pytest.raises(ConfigError) as refused:
        load({"GPUPROXY_MAX_BODY_BYTES": value})

    assert refused.value.field == "GPUPROXY_MAX_BODY_BYTES"


def test_too_large_is_413_on_http_and_resource_exhausted_on_grpc_naming_the_limit() -> None:
    error = too_large(65536)

    status, body = http_answer(error)
    code, message = grpc_status(error)

    assert status == 413
    assert body == {
        "error": {
            "code": "resource_exhausted",
            "message": "the request body is larger than 65536 bytes, the most this gateway "
            "reads (GPUPROXY_MAX_BODY_BYTES)",
            "field": "body",
        }
    }
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65536 bytes" in message


def test_too_large_is_not_worth_retrying_unlike_other_exhaustion() -> None:
    assert PayloadTooLarge("too big").code is ErrorCode.RESOURCE_EXHAUSTED
    assert not PayloadTooLarge("too big").to_info().retriable
