"""What each entry point demands of its caller: the one table for gRPC, and the rule type
both front doors share. A method missing from the table is refused (fail closed)."""

from __future__ import annotations

import msgspec

from schemas.access import Scope


class Requirement(msgspec.Struct, frozen=True, kw_only=True):
    public: bool = False
    """No credential needed (health, login, registration, refresh and logout)."""
    scope: Scope | None = None
    """A scope the credential must hold; None: any valid credential will do."""
    sessions_only: bool = False
    """Only a signed-in session (a JWT), never an API key: what mints or manages credentials."""
    token_field: str = ""
    """A request field that may carry the JWT instead of metadata (CreateAPIKey's `token`)."""
    per_address: bool = False
    """Counted against the caller's address: public routes that check a password or token,
    so guessing them costs the guesser (`GPUPROXY_AUTH_ATTEMPTS_PER_MINUTE`)."""


PUBLIC = Requirement(public=True)
CREDENTIALS = Requirement(public=True, per_address=True)
SIGNED_IN = Requirement()
SESSION = Requirement(sessions_only=True)
INFERENCE = Requirement(scope=Scope.INFERENCE)
GPUS = Requirement(scope=Scope.GPUS)
BILLING = Requirement(scope=Scope.BILLING)
ADMIN = Requirement(scope=Scope.ADMIN)

_SERVICE = "/gpuproxy.GPUProxyService/"

GRPC_METHODS: dict[str, Requirement] = {
    f"{_SERVICE}Login": CREDENTIALS,
    f"{_SERVICE}HealthCheck": PUBLIC,
    f"{_SERVICE}CreateAPIKey": Requirement(
        sessions_only=True,
        token_field="token",  # noqa: S106 - the name of the request field, not a secret
    ),
    f"{_SERVICE}Ping": SIGNED_IN,
    f"{_SERVICE}ListGPUInstances": GPUS,
    f"{_SERVICE}CreateGPUInstance": GPUS,
    f"{_SERVICE}DestroyGPUInstance": GPUS,
    f"{_SERVICE}GetGPUInstance": GPUS,
    f"{_SERVICE}ReserveGPUs": GPUS,
    f"{_SERVICE}BatchCreateGPUInstances": GPUS,
    f"{_SERVICE}ListOwnedGPUInstances": GPUS,
    f"{_SERVICE}GetReservation": GPUS,
    f"{_SERVICE}ListReservations": GPUS,
    f"{_SERVICE}RenewReservation": GPUS,
    f"{_SERVICE}ReleaseReservation": GPUS,
    f"{_SERVICE}ProxyRequest": INFERENCE,
    f"{_SERVICE}StreamProxyRequest": INFERENCE,
    f"{_SERVICE}SendCUICMessage": INFERENCE,
    f"{_SERVICE}StreamCUICMessage": INFERENCE,
    f"{_SERVICE}GetLoadInfo": INFERENCE,
    # The strategy routes everybody's traffic: an operator's switch.
    f"{_SERVICE}SetLoadBalancerStrategy": ADMIN,
    f"{_SERVICE}CreatePayment": BILLING,
    f"{_SERVICE}GetTransactions": BILLING,
    f"{_SERVICE}GetSpendingInfo": BILLING,
    f"{_SERVICE}CheckSpendingLimit": BILLING,
    # Load balancers and tooling probe these without credentials.
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
}
