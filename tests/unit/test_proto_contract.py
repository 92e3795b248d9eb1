"""The gRPC wire contract, read from the compiled descriptor.

Existing clients depend on these names, numbers and types; the tables below are written from
the API specification, not from the .proto file, so any drift in proto/gpuproxy.proto or in the
generated code fails here.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from gateway.pb import gpuproxy_pb2

SERVICE_FULL_NAME = "gpuproxy.GPUProxyService"

# Field name -> (number, type). Types: a scalar name, a message name, "repeated <type>" or
# "map<key,value>".
FieldTable = dict[str, tuple[int, str]]

ORIGINAL_FIELDS: dict[str, FieldTable] = {
    "LoginRequest": {"email": (1, "string"), "password": (2, "string")},
    "LoginResponse": {
        "token": (1, "string"),
        "user_id": (2, "string"),
        "email": (3, "string"),
        "refresh_token": (4, "string"),
        "expires_in": (5, "int64"),
    },
    "CreateAPIKeyRequest": {"name": (1, "string"), "token": (2, "string")},
    "CreateAPIKeyResponse": {
        "api_key": (1, "string"),
        "name": (2, "string"),
        "created_at": (3, "int64"),
    },
    "ListGPUInstancesRequest": {
        "provider": (1, "string"),
        "min_vram": (2, "double"),
        "max_price": (3, "double"),
        "gpu_model": (4, "string"),
    },
    "GPUInstance": {
        "id": (1, "string"),
        "provider": (2, "string"),
        "status": (3, "string"),
        "price_per_hour": (4, "double"),
        "vram_gb": (5, "int32"),
        "gpu_model": (6, "string"),
        "num_gpus": (7, "int32"),
        "location": (8, "string"),
        "metadata": (9, "map<string,string>"),
    },
    "ListGPUInstancesResponse": {
        "instances": (1, "repeated GPUInstance"),
        "total_count": (2, "int32"),
    },
    "CreateGPUInstanceRequest": {
        "provider": (1, "string"),
        "instance_id": (2, "string"),
        "image": (3, "string"),
        "env": (4, "map<string,string>"),
        "ports": (5, "repeated int32"),
    },
    "CreateGPUInstanceResponse": {
        "instance_id": (1, "string"),
        "provider": (2, "string"),
        "status": (3, "string"),
        "message": (4, "string"),
    },
    "DestroyGPUInstanceRequest": {"provider": (1, "string"), "instance_id": (2, "string")},
    "DestroyGPUInstanceResponse": {"success": (1, "bool"), "message": (2, "string")},
    "GetGPUInstanceRequest": {"provider": (1, "string"), "instance_id": (2, "string")},
    "GetGPUInstanceResponse": {"instance": (1, "GPUInstance")},
    "ProxyRequestMessage": {
        "protocol": (1, "string"),
        "target_url": (2, "string"),
        "method": (3, "string"),
        "headers": (4, "map<string,string>"),
        "body": (5, "bytes"),
        "timeout": (6, "int32"),
    },
    "ProxyResponse": {
        "status_code": (1, "int32"),
        "headers": (2, "map<string,string>"),
        "body": (3, "bytes"),
        "error": (4, "string"),
    },
    "CreatePaymentRequest": {
        "amount": (1, "double"),
        "currency": (2, "string"),
        "provider": (3, "string"),
        "payment_method": (4, "string"),
    },
    "CreatePaymentResponse": {
        "payment_id": (1, "string"),
        "status": (2, "string"),
        "amount": (3, "double"),
        "currency": (4, "string"),
    },
    "GetTransactionsRequest": {"limit": (1, "int32"), "offset": (2, "int32")},
    "Transaction": {
        "id": (1, "string"),
        "type": (2, "string"),
        "amount": (3, "double"),
        "currency": (4, "string"),
        "timestamp": (5, "int64"),
        "status": (6, "string"),
        "description": (7, "string"),
    },
    "GetTransactionsResponse": {
        "transactions": (1, "repeated Transaction"),
        "total_count": (2, "int32"),
    },
    "GetSpendingInfoRequest": {},
    "SpendingWindow": {
        "window": (1, "string"),
        "spent": (2, "double"),
        "limit": (3, "double"),
        "remaining": (4, "double"),
        "exceeded": (5, "bool"),
    },
    "GetSpendingInfoResponse": {
        "windows": (1, "repeated SpendingWindow"),
        "guard_rails_enabled": (2, "bool"),
        "total_spent_24h": (3, "double"),
    },
    "CheckSpendingLimitRequest": {"amount": (1, "double")},
    "CheckSpendingLimitResponse": {
        "allowed": (1, "bool"),
        "reason": (2, "string"),
        "would_exceed": (3, "repeated SpendingWindow"),
    },
    "SetLoadBalancerStrategyRequest": {"strategy": (1, "string")},
    "SetLoadBalancerStrategyResponse": {"strategy": (1, "string"), "success": (2, "bool")},
    "GetLoadInfoRequest": {"type": (1, "string")},
    "LoadInfo": {
        "instance_id": (1, "string"),
        "provider": (2, "string"),
        "connections": (3, "int32"),
        "avg_response_time_ms": (4, "double"),
        "load_score": (5, "double"),
    },
    "GetLoadInfoResponse": {
        "server_load": (1, "repeated LoadInfo"),
        "provider_load": (2, "repeated LoadInfo"),
        "current_strategy": (3, "string"),
    },
    "ReserveGPUsRequest": {
        "count": (1, "int32"),
        "provider": (2, "string"),
        "min_vram": (3, "double"),
        "max_price": (4, "double"),
    },
    "ReserveGPUsResponse": {
        "reserved_instances": (1, "repeated GPUInstance"),
        "reserved_count": (2, "int32"),
        "message": (3, "string"),
    },
    "CUICMessageRequest": {
        "stream_id": (1, "string"),
        "message_id": (2, "string"),
        "version": (3, "string"),
        "sender": (4, "string"),
        "receiver": (5, "string"),
        "message_type": (6, "string"),
        "priority": (7, "int32"),
        "timestamp": (8, "int64"),
        "payload": (9, "bytes"),
        "metadata": (10, "map<string,string>"),
        "congestion_hint": (11, "string"),
    },
    "CUICStatus": {
        "code": (1, "int32"),
        "message": (2, "string"),
        "success": (3, "bool"),
        "retriable": (4, "bool"),
    },
    "CUICMessageResponse": {
        "stream_id": (1, "string"),
        "message_id": (2, "string"),
        "in_reply_to": (3, "string"),
        "version": (4, "string"),
        "sender": (5, "string"),
        "receiver": (6, "string"),
        "status": (7, "CUICStatus"),
        "payload": (8, "bytes"),
        "timestamp": (9, "int64"),
        "metadata": (10, "map<string,string>"),
        "congestion_hint": (11, "string"),
    },
    "HealthCheckRequest": {},
    "HealthCheckResponse": {
        "status": (1, "string"),
        "timestamp": (2, "int64"),
        "details": (3, "map<string,string>"),
    },
}

# (message, double money field) -> number of its exact int64 `<field>_micros` sibling.
MONEY_MICROS_NUMBERS: dict[tuple[str, str], int] = {
    ("GPUInstance", "price_per_hour"): 10,
    ("ListGPUInstancesRequest", "max_price"): 5,
    ("CreatePaymentRequest", "amount"): 5,
    ("CreatePaymentResponse", "amount"): 5,
    ("Transaction", "amount"): 8,
    ("SpendingWindow", "spent"): 6,
    ("SpendingWindow", "limit"): 7,
    ("SpendingWindow", "remaining"): 8,
    ("GetSpendingInfoResponse", "total_spent_24h"): 4,
    ("CheckSpendingLimitRequest", "amount"): 2,
    ("ReserveGPUsRequest", "max_price"): 5,
}

# Doubles that measure something other than money, so they need no micros sibling.
NON_MONEY_DOUBLES: frozenset[tuple[str, str]] = frozenset(
    {
        ("ListGPUInstancesRequest", "min_vram"),
        ("ReserveGPUsRequest", "min_vram"),
        ("LoadInfo", "avg_response_time_ms"),
        ("LoadInfo", "load_score"),
    }
)

# Fields added to messages of the original contract, on numbers it never used.
ADDED_FIELDS: dict[str, FieldTable] = {
    "ProxyRequestMessage": {"request_id": (7, "string")},
    "ProxyResponse": {"request_id": (5, "string"), "done": (6, "bool")},
    "CreateAPIKeyRequest": {
        "scopes": (3, "repeated string"),
        "expires_in_days": (4, "int32"),
        "rate_limit_per_minute": (5, "int32"),
    },
    "CreateAPIKeyResponse": {
        "key_id": (4, "string"),
        "scopes": (5, "repeated string"),
        "expires_at": (6, "int64"),
        "rate_limit_per_minute": (7, "int32"),
    },
    "ListGPUInstancesRequest": {"location": (6, "string")},
    "GPUInstance": {
        "kind": (11, "string"),
        "reason": (12, "string"),
        "endpoint": (13, "string"),
        "offer_id": (14, "string"),
        "reservation_id": (15, "string"),
        "created_at": (16, "int64"),
        "vendor": (17, "string"),
        "tier": (18, "string"),
        "available": (19, "int32"),
        "provider_instance_id": (20, "string"),
        "owner": (21, "string"),
    },
    "ListGPUInstancesResponse": {"unavailable_providers": (3, "map<string,string>")},
    "CreateGPUInstanceRequest": {"disk_gb": (6, "int32")},
    "CreateGPUInstanceResponse": {"instance": (5, "GPUInstance")},
    "DestroyGPUInstanceResponse": {"instance": (3, "GPUInstance")},
    "ReserveGPUsRequest": {
        "gpu_model": (6, "string"),
        "location": (7, "string"),
        "image": (8, "string"),
        "env": (9, "map<string,string>"),
        "ports": (10, "repeated int32"),
        "disk_gb": (11, "int32"),
        "strategy": (12, "string"),
        "lease_seconds": (13, "int64"),
        "ready_timeout_seconds": (14, "int32"),
    },
    "ReserveGPUsResponse": {"reservation": (4, "Reservation")},
}

NEW_MESSAGES: dict[str, FieldTable] = {
    "PingRequest": {
        "message": (1, "string"),
        "worker_kind": (2, "string"),
        "delay_ms": (3, "int32"),
    },
    "PingResponse": {
        "message": (1, "string"),
        "worker_kind": (2, "string"),
        "worker_id": (3, "string"),
        "attempt": (4, "int32"),
    },
    "Reservation": {
        "id": (1, "string"),
        "owner": (2, "string"),
        "state": (3, "string"),
        "reason": (4, "string"),
        "count": (5, "int32"),
        "instances": (6, "repeated GPUInstance"),
        "lease_seconds": (7, "int64"),
        "lease_expires_at": (8, "int64"),
        "created_at": (9, "int64"),
        "strategy": (10, "string"),
    },
    "GetReservationRequest": {"reservation_id": (1, "string")},
    "ReservationResponse": {"reservation": (1, "Reservation")},
    "ListReservationsRequest": {"include_ended": (1, "bool"), "user_id": (2, "string")},
    "ListReservationsResponse": {"reservations": (1, "repeated Reservation")},
    "RenewReservationRequest": {"reservation_id": (1, "string"), "lease_seconds": (2, "int64")},
    "ReleaseReservationRequest": {"reservation_id": (1, "string")},
    "ListOwnedGPUInstancesRequest": {"include_ended": (1, "bool"), "user_id": (2, "string")},
    "BatchCreateGPUInstancesRequest": {
        "vastai_count": (1, "int32"),
        "ionet_count": (2, "int32"),
        "counts": (3, "map<string,int32>"),
        "config": (4, "CreateGPUInstanceRequest"),
        "filters": (5, "ListGPUInstancesRequest"),
    },
    "BatchFailure": {"provider": (1, "string"), "code": (2, "string"), "message": (3, "string")},
    "BatchCreateGPUInstancesResponse": {
        "instances": (1, "repeated GPUInstance"),
        "failures": (2, "repeated BatchFailure"),
    },
}

# RPC name -> (input message, output message, client streaming, server streaming), in the
# order the service declares them; the additions (Ping, then GPU lifecycle) come last.
RPCS: dict[str, tuple[str, str, bool, bool]] = {
    "Login": ("LoginRequest", "LoginResponse", False, False),
    "CreateAPIKey": ("CreateAPIKeyRequest", "CreateAPIKeyResponse", False, False),
    "ListGPUInstances": ("ListGPUInstancesRequest", "ListGPUInstancesResponse", False, False),
    "CreateGPUInstance": ("CreateGPUInstanceRequest", "CreateGPUInstanceResponse", False, False),
    "DestroyGPUInstance": (
        "DestroyGPUInstanceRequest",
        "DestroyGPUInstanceResponse",
        False,
        False,
    ),
    "GetGPUInstance": ("GetGPUInstanceRequest", "GetGPUInstanceResponse", False, False),
    "ProxyRequest": ("ProxyRequestMessage", "ProxyResponse", False, False),
    "StreamProxyRequest": ("ProxyRequestMessage", "ProxyResponse", True, True),
    "CreatePayment": ("CreatePaymentRequest", "CreatePaymentResponse", False, False),
    "GetTransactions": ("GetTransactionsRequest", "GetTransactionsResponse", False, False),
    "GetSpendingInfo": ("GetSpendingInfoRequest", "GetSpendingInfoResponse", False, False),
    "CheckSpendingLimit": (
        "CheckSpendingLimitRequest",
        "CheckSpendingLimitResponse",
        False,
        False,
    ),
    "SetLoadBalancerStrategy": (
        "SetLoadBalancerStrategyRequest",
        "SetLoadBalancerStrategyResponse",
        False,
        False,
    ),
    "GetLoadInfo": ("GetLoadInfoRequest", "GetLoadInfoResponse", False, False),
    "ReserveGPUs": ("ReserveGPUsRequest", "ReserveGPUsResponse", False, False),
    "SendCUICMessage": ("CUICMessageRequest", "CUICMessageResponse", False, False),
    "StreamCUICMessage": ("CUICMessageRequest", "CUICMessageResponse", True, True),
    "HealthCheck": ("HealthCheckRequest", "HealthCheckResponse", False, False),
    "Ping": ("PingRequest", "PingResponse", False, False),
    "BatchCreateGPUInstances": (
        "BatchCreateGPUInstancesRequest",
        "BatchCreateGPUInstancesResponse",
        False,
        False,
    ),
    "ListOwnedGPUInstances": (
        "ListOwnedGPUInstancesRequest",
        "ListGPUInstancesResponse",
        False,
        False,
    ),
    "GetReservation": ("GetReservationRequest", "ReservationResponse", False, False),
    "ListReservations": ("ListReservationsRequest", "ListReservationsResponse", False, False),
    "RenewReservation": ("RenewReservationRequest", "ReservationResponse", False, False),
    "ReleaseReservation": ("ReleaseReservationRequest", "ReservationResponse", False, False),
}

SCALAR_TYPE_NAMES: dict[int, str] = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
    FieldDescriptor.TYPE_FIXED32: "fixed32",
    FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
}


def expected_fields() -> dict[str, FieldTable]:
    """Every message of the contract with all its fields: original, micros siblings, new."""
    tables = {name: dict(fields) for name, fields in ORIGINAL_FIELDS.items()}
    for (message, field), number in MONEY_MICROS_NUMBERS.items():
        tables[message][f"{field}_micros"] = (number, "int64")
    for message, fields in ADDED_FIELDS.items():
        tables[message].update(fields)
    tables.update(NEW_MESSAGES)
    return tables


def element_type(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return str(field.message_type.name)
    if field.enum_type is not None:
        return str(field.enum_type.name)
    return SCALAR_TYPE_NAMES[field.type]


def type_of(field: FieldDescriptor) -> str:
    """The field's type spelled as in a .proto file: "int64", "repeated X", "map<K,V>"."""
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key = element_type(entry.fields_by_name["key"])
        value = element_type(entry.fields_by_name["value"])
        return f"map<{key},{value}>"
    if field.is_repeated:
        return f"repeated {element_type(field)}"
    return element_type(field)


def message(name: str) -> Descriptor:
    descriptor: Descriptor = gpuproxy_pb2.DESCRIPTOR.message_types_by_name[name]
    return descriptor


def actual_fields(name: str) -> FieldTable:
    return {field.name: (field.number, type_of(field)) for field in message(name).fields}


def test_file_declares_package_gpuproxy_and_the_service_full_name() -> None:
    assert gpuproxy_pb2.DESCRIPTOR.package == "gpuproxy"
    services = gpuproxy_pb2.DESCRIPTOR.services_by_name
    assert list(services) == ["GPUProxyService"]
    assert services["GPUProxyService"].full_name == SERVICE_FULL_NAME


def test_file_declares_exactly_the_messages_of_the_contract() -> None:
    assert set(gpuproxy_pb2.DESCRIPTOR.message_types_by_name) == set(expected_fields())


@pytest.mark.parametrize("message_name", sorted(ORIGINAL_FIELDS))
def test_every_original_field_keeps_its_number_and_type(message_name: str) -> None:
    actual = actual_fields(message_name)
    for field_name, expected in ORIGINAL_FIELDS[message_name].items():
        assert actual.get(field_name) == expected, f"{message_name}.{field_name}"


@pytest.mark.parametrize("message_name", sorted(expected_fields()))
def test_every_message_has_exactly_the_fields_of_the_contract(message_name: str) -> None:
    assert actual_fields(message_name) == expected_fields()[message_name]


@pytest.mark.parametrize("message_name", sorted(expected_fields()))
def test_no_field_number_is_used_twice_in_a_message(message_name: str) -> None:
    numbers = [field.number for field in message(message_name).fields]
    assert len(numbers) == len(set(numbers))


@pytest.mark.parametrize(("message_name", "field_name"), sorted(MONEY_MICROS_NUMBERS))
def test_every_double_money_field_has_an_int64_micros_sibling(
    message_name: str, field_name: str
) -> None:
    fields = message(message_name).fields_by_name
    assert type_of(fields[field_name]) == "double"
    sibling = fields.get(f"{field_name}_micros")
    assert sibling is not None, f"{message_name}.{field_name}_micros is missing"
    assert type_of(sibling) == "int64"
    assert sibling.number == MONEY_MICROS_NUMBERS[(message_name, field_name)]
    original_numbers = {number for number, _ in ORIGINAL_FIELDS[message_name].values()}
    assert sibling.number not in original_numbers


def test_every_double_is_either_money_with_micros_or_a_known_non_money_measure() -> None:
    doubles = {
        (descriptor.name, field.name)
        for descriptor in gpuproxy_pb2.DESCRIPTOR.message_types_by_name.values()
        for field in descriptor.fields
        if field.type == FieldDescriptor.TYPE_DOUBLE
    }
    assert doubles == set(MONEY_MICROS_NUMBERS) | NON_MONEY_DOUBLES


def test_service_declares_every_rpc_in_order_with_ping_last() -> None:
    service = gpuproxy_pb2.DESCRIPTOR.services_by_name["GPUProxyService"]
    assert [method.name for method in service.methods] == list(RPCS)


@pytest.mark.parametrize("rpc_name", list(RPCS))
def test_every_rpc_keeps_its_input_output_and_streaming(rpc_name: str) -> None:
    service = gpuproxy_pb2.DESCRIPTOR.services_by_name["GPUProxyService"]
    method = service.methods_by_name[rpc_name]
    input_name, output_name, client_streaming, server_streaming = RPCS[rpc_name]
    assert method.full_name == f"{SERVICE_FULL_NAME}.{rpc_name}"
    assert method.input_type.full_name == f"gpuproxy.{input_name}"
    assert method.output_type.full_name == f"gpuproxy.{output_name}"
    assert method.client_streaming is client_streaming
    assert method.server_streaming is server_streaming


def test_micros_field_carries_amounts_a_double_cannot_hold_exactly() -> None:
    beyond_double_precision = 2**53 + 1
    sent = gpuproxy_pb2.Transaction(amount_micros=beyond_double_precision)
    received = gpuproxy_pb2.Transaction.FromString(sent.SerializeToString())
    assert received.amount_micros == beyond_double_precision
