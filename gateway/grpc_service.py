"""The gRPC front door: `gpuproxy.GPUProxyService`.

Every method converts protobuf to a bus command in `gateway.convert`, sends it through the
`CommandCaller`, and maps any `GpuproxyError` to a status through `gateway.errors`. Methods
whose worker side is not in this version answer UNIMPLEMENTED and say what is missing.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast

import grpc

from bus.caller import CommandCaller
from gateway import convert, validation
from gateway.accounts.service import AccountService, KeyRequest
from gateway.auth import principal
from gateway.config import GatewayConfig
from gateway.errors import grpc_status
from gateway.gpus import requests
from gateway.gpus.service import GpuService
from gateway.gpus.views import instance_proto, offer_proto, reservation_proto
from gateway.health import Health
from gateway.inference import grpc as inference_grpc
from gateway.inference.balancing import Balancing
from gateway.inference.service import InferenceService, bounded_timeout
from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from schemas.errors import GpuproxyError, InvalidArgument, Unimplemented
from schemas.gpus import LaunchSpec, OfferQuery
from schemas.replies import Pong, ReservationView

Context = grpc.aio.ServicerContext[Any, Any]
P = ParamSpec("P")
R = TypeVar("R")

IDEMPOTENCY_KEY = "idempotency-key"

INFERENCE = "the inference data plane (the proxy worker)"
BILLING = "billing (the billing worker's ledger, payments and spending windows)"
CUIC = "CUIC messaging over the inference data plane"


def answers_errors(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn a raised `GpuproxyError` into the matching gRPC status and message. Any other
    exception is `gateway.unexpected`'s: INTERNAL with an error id, never its text."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except GpuproxyError as exc:
            # grpc calls a servicer method as (self, request, context).
            context = cast(Context, args[2])
            code, message = grpc_status(exc)
            await context.abort(code, message)

    return wrapper


def _missing(rpc: str, feature: str) -> Unimplemented:
    return Unimplemented(f"{rpc} needs {feature}, which this version of gpuproxy does not serve")


async def _refuse(context: Context, error: GpuproxyError) -> None:
    code, message = grpc_status(error)
    await context.abort(code, message)


class GPUProxyService(pb_grpc.GPUProxyServiceServicer):
    def __init__(
        self,
        caller: CommandCaller,
        health: Health,
        accounts: AccountService,
        config: GatewayConfig,
        gpus: GpuService,
    ) -> None:
        self._caller = caller
        self._health = health
        self._accounts = accounts
        self._config = config
        self._gpus = gpus
        self._inference = InferenceService(caller)
        self._balancing = Balancing(caller, config)

    def _inference_timeout(self, context: Context) -> float:
        remaining: float | None = context.time_remaining()
        if remaining is None:
            return self._config.inference_timeout
        return max(min(remaining, self._config.inference_timeout), 0.001)

    def _timeout(self, context: Context) -> float:
        # None when the client set no deadline, whatever the stubs say.
        remaining: float | None = context.time_remaining()
        if remaining is None:
            return self._config.request_timeout
        return max(min(remaining, self._config.request_timeout), 0.001)

    @staticmethod
    def _idempotency_key(context: Context) -> str | None:
        for key, value in context.invocation_metadata() or ():
            if key == IDEMPOTENCY_KEY:
                return str(value)
        return None

    @answers_errors
    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: Context
    ) -> pb.HealthCheckResponse:
        return convert.health_to_proto(await self._health.report())

    @answers_errors
    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        caller = principal.current()
        command_id = validation.command_id(
            self._idempotency_key(context), field=IDEMPOTENCY_KEY, owner=caller.user_id
        )
        kind, command = convert.ping_from_proto(
            request, command_id=command_id, actor=caller.user_id
        )
        reply = await self._caller.call(kind, command, timeout=self._timeout(context))
        assert isinstance(reply, Pong)
        return convert.pong_to_proto(reply)

    # --- answered by later parts of the system -------------------------------------------

    @answers_errors
    async def Login(self, request: pb.LoginRequest, context: Context) -> pb.LoginResponse:
        grant = await self._accounts.login(request.email, request.password)
        return pb.LoginResponse(
            token=grant.access_token,
            user_id=grant.user_id,
            email=grant.email,
            refresh_token=grant.refresh_token,
            expires_in=grant.expires_in,
        )

    @answers_errors
    async def CreateAPIKey(
        self, request: pb.CreateAPIKeyRequest, context: Context
    ) -> pb.CreateAPIKeyResponse:
        made = await self._accounts.create_key(
            principal.current(),
            KeyRequest(
                name=request.name,
                scopes=list(request.scopes) or None,
                expires_in_days=request.expires_in_days or None,
                rate_limit_per_minute=(
                    request.rate_limit_per_minute
                    if request.HasField("rate_limit_per_minute")
                    else None
                ),
            ),
        )
        return pb.CreateAPIKeyResponse(
            api_key=made.api_key,
            name=made.info.name,
            created_at=made.info.created_at_ms // 1000,
            key_id=made.info.id,
            scopes=made.info.scopes,
            expires_at=(made.info.expires_at_ms or 0) // 1000,
            rate_limit_per_minute=made.info.rate_limit_per_minute or 0,
        )

    @answers_errors
    async def ListGPUInstances(
        self, request: pb.ListGPUInstancesRequest, context: Context
    ) -> pb.ListGPUInstancesResponse:
        found = await self._gpus.search(principal.current(), _query(request, prefix=""))
        return pb.ListGPUInstancesResponse(
            instances=[offer_proto(o) for o in found.offers],
            total_count=len(found.offers),
            unavailable_providers=found.unavailable,
        )

    @answers_errors
    async def GetGPUInstance(
        self, request: pb.GetGPUInstanceRequest, context: Context
    ) -> pb.GetGPUInstanceResponse:
        found = await self._gpus.find(
            principal.current(),
            requests.provider(request.provider),
            requests.identifier(request.instance_id, field="instance_id"),
        )
        if found.instance is not None:
            return pb.GetGPUInstanceResponse(instance=instance_proto(found.instance))
        assert found.offer is not None
        return pb.GetGPUInstanceResponse(instance=offer_proto(found.offer))

    @answers_errors
    async def CreateGPUInstance(
        self, request: pb.CreateGPUInstanceRequest, context: Context
    ) -> pb.CreateGPUInstanceResponse:
        made = await self._gpus.create(
            principal.current(),
            requests.provider(request.provider),
            requests.identifier(request.instance_id, field="instance_id"),
            _spec(request, prefix=""),
            self._idempotency_key(context),
            IDEMPOTENCY_KEY,
        )
        instance = made.instance
        return pb.CreateGPUInstanceResponse(
            instance_id=instance.id,
            provider=str(instance.provider),
            status=str(instance.state),
            message=made.message,
            instance=instance_proto(instance),
        )

    @answers_errors
    async def BatchCreateGPUInstances(
        self, request: pb.BatchCreateGPUInstancesRequest, context: Context
    ) -> pb.BatchCreateGPUInstancesResponse:
        counts = requests.batch_counts(
            request.counts, vastai=request.vastai_count, ionet=request.ionet_count
        )
        made = await self._gpus.batch(
            principal.current(),
            counts,
            _query(request.filters, prefix="filters."),
            _spec(request.config, prefix="config."),
            self._idempotency_key(context),
            IDEMPOTENCY_KEY,
        )
        return pb.BatchCreateGPUInstancesResponse(
            instances=[instance_proto(i) for i in made.instances],
            failures=[
                pb.BatchFailure(
                    provider=str(f.provider), code=str(f.error.code), message=f.error.message
                )
                for f in made.failures
            ],
        )

    @answers_errors
    async def DestroyGPUInstance(
        self, request: pb.DestroyGPUInstanceRequest, context: Context
    ) -> pb.DestroyGPUInstanceResponse:
        done = await self._gpus.destroy(
            principal.current(),
            requests.provider(request.provider) if request.provider else None,
            requests.identifier(request.instance_id, field="instance_id"),
            self._idempotency_key(context),
            IDEMPOTENCY_KEY,
        )
        return pb.DestroyGPUInstanceResponse(
            success=True, message=done.message, instance=instance_proto(done.instance)
        )

    @answers_errors
    async def ListOwnedGPUInstances(
        self, request: pb.ListOwnedGPUInstancesRequest, context: Context
    ) -> pb.ListGPUInstancesResponse:
        caller = principal.current()
        owner = await self._accounts.acting_for(caller, request.user_id, every_account=True)
        listed = await self._gpus.instances(caller, owner, include_ended=request.include_ended)
        return pb.ListGPUInstancesResponse(
            instances=[instance_proto(i) for i in listed.instances],
            total_count=len(listed.instances),
        )

    @answers_errors
    async def ReserveGPUs(
        self, request: pb.ReserveGPUsRequest, context: Context
    ) -> pb.ReserveGPUsResponse:
        view = await self._gpus.reserve(
            principal.current(),
            count=requests.count(request.count),
            query=_query(request, prefix=""),
            spec=requests.spec(
                image=request.image,
                env=dict(request.env),
                ports=list(request.ports),
                disk_gb=request.disk_gb,
            ),
            strategy=requests.strategy(request.strategy),
            lease_seconds=(
                requests.lease_seconds(request.lease_seconds) if request.lease_seconds else None
            ),
            ready_seconds=requests.ready_seconds(request.ready_timeout_seconds),
            idempotency_key=self._idempotency_key(context),
            key_field=IDEMPOTENCY_KEY,
        )
        return pb.ReserveGPUsResponse(
            reserved_instances=[instance_proto(i) for i in view.instances],
            reserved_count=len(view.instances),
            message=view.reservation.reason,
            reservation=_reservation(view),
        )

    @answers_errors
    async def GetReservation(
        self, request: pb.GetReservationRequest, context: Context
    ) -> pb.ReservationResponse:
        view = await self._gpus.reservation(
            principal.current(),
            requests.identifier(request.reservation_id, field="reservation_id"),
        )
        return pb.ReservationResponse(reservation=_reservation(view))

    @answers_errors
    async def ListReservations(
        self, request: pb.ListReservationsRequest, context: Context
    ) -> pb.ListReservationsResponse:
        caller = principal.current()
        owner = await self._accounts.acting_for(caller, request.user_id, every_account=True)
        views = await self._gpus.reservations(caller, owner, include_ended=request.include_ended)
        return pb.ListReservationsResponse(reservations=[_reservation(v) for v in views])

    @answers_errors
    async def RenewReservation(
        self, request: pb.RenewReservationRequest, context: Context
    ) -> pb.ReservationResponse:
        if not request.lease_seconds:
            raise InvalidArgument("say how long the lease should run", field="lease_seconds")
        view = await self._gpus.renew(
            principal.current(),
            requests.identifier(request.reservation_id, field="reservation_id"),
            requests.lease_seconds(request.lease_seconds),
        )
        return pb.ReservationResponse(reservation=_reservation(view))

    @answers_errors
    async def ReleaseReservation(
        self, request: pb.ReleaseReservationRequest, context: Context
    ) -> pb.ReservationResponse:
        view = await self._gpus.release(
            principal.current(),
            requests.identifier(request.reservation_id, field="reservation_id"),
        )
        return pb.ReservationResponse(reservation=_reservation(view))

    @answers_errors
    async def ProxyRequest(
        self, request: pb.ProxyRequestMessage, context: Context
    ) -> pb.ProxyResponse:
        command = inference_grpc.command_of(
            self._inference,
            request,
            principal.current(),
            idempotency_key=self._idempotency_key(context),
        )
        timeout = bounded_timeout(request.timeout, self._inference_timeout(context))
        pieces = [
            m async for m in inference_grpc.answer(self._inference, command, "", timeout=timeout)
        ]
        # A unary answer is whole: a streamed one is its pieces joined, the last one's
        # headers (the cost) with the first one's.
        headers = {k: v for m in pieces for k, v in m.headers.items()}
        return pb.ProxyResponse(
            status_code=pieces[0].status_code,
            headers=headers,
            body=b"".join(m.body for m in pieces),
            done=True,
        )

    # A coroutine, not a generator: grpc.aio then lets it answer through `context` alone.
    async def StreamProxyRequest(  # type: ignore[override]
        self, request_iterator: Any, context: Context
    ) -> None:
        conversation = inference_grpc.Conversation(
            self._inference,
            principal.current(),
            context,
            timeout=self._inference_timeout(context),
        )
        await conversation.run(request_iterator)

    @answers_errors
    async def SetLoadBalancerStrategy(
        self, request: pb.SetLoadBalancerStrategyRequest, context: Context
    ) -> pb.SetLoadBalancerStrategyResponse:
        who = principal.current()
        view = await self._balancing.set(
            who, request.strategy, owner=who.user_id, fleet_default=False
        )
        return pb.SetLoadBalancerStrategyResponse(strategy=view.strategy, success=True)

    @answers_errors
    async def GetLoadInfo(
        self, request: pb.GetLoadInfoRequest, context: Context
    ) -> pb.GetLoadInfoResponse:
        kind = request.type or "all"
        if kind not in ("server", "provider", "all"):
            raise InvalidArgument("one of server, provider or all", field="type")
        view = await self._balancing.load(principal.current())
        servers = [
            pb.LoadInfo(
                instance_id=row.instance_id,
                provider=row.provider,
                connections=row.in_flight,
                avg_response_time_ms=row.avg_response_ms or 0.0,
                load_score=row.load_score,
            )
            for row in view.load.instances
        ]
        providers = [
            pb.LoadInfo(
                provider=row.provider,
                connections=row.in_flight,
                avg_response_time_ms=row.avg_response_ms or 0.0,
                load_score=row.load_score,
            )
            for row in view.load.providers
        ]
        return pb.GetLoadInfoResponse(
            server_load=servers if kind != "provider" else [],
            provider_load=providers if kind != "server" else [],
            current_strategy=view.strategy,
        )

    @answers_errors
    async def CreatePayment(
        self, request: pb.CreatePaymentRequest, context: Context
    ) -> pb.CreatePaymentResponse:
        raise _missing("CreatePayment", BILLING)

    @answers_errors
    async def GetTransactions(
        self, request: pb.GetTransactionsRequest, context: Context
    ) -> pb.GetTransactionsResponse:
        raise _missing("GetTransactions", BILLING)

    @answers_errors
    async def GetSpendingInfo(
        self, request: pb.GetSpendingInfoRequest, context: Context
    ) -> pb.GetSpendingInfoResponse:
        raise _missing("GetSpendingInfo", BILLING)

    @answers_errors
    async def CheckSpendingLimit(
        self, request: pb.CheckSpendingLimitRequest, context: Context
    ) -> pb.CheckSpendingLimitResponse:
        raise _missing("CheckSpendingLimit", BILLING)

    @answers_errors
    async def SendCUICMessage(
        self, request: pb.CUICMessageRequest, context: Context
    ) -> pb.CUICMessageResponse:
        raise _missing("SendCUICMessage", CUIC)

    # A coroutine, not a generator: grpc.aio then lets it answer through `context` alone.
    async def StreamCUICMessage(  # type: ignore[override]
        self, request_iterator: Any, context: Context
    ) -> None:
        await _refuse(context, _missing("StreamCUICMessage", CUIC))


def _reservation(view: ReservationView) -> pb.Reservation:
    return reservation_proto(view.reservation, view.instances)


def _query(
    request: pb.ListGPUInstancesRequest | pb.ReserveGPUsRequest, *, prefix: str
) -> OfferQuery:
    """The filters both messages carry under the same names."""
    price = request.max_price_micros or (
        requests.max_price_micros(request.max_price, field=f"{prefix}max_price")
        if request.max_price
        else 0
    )
    return requests.query(
        provider_text=request.provider,
        min_vram=request.min_vram,
        max_price_micros=price,
        gpu_model=request.gpu_model,
        location=request.location,
        prefix=prefix,
    )


def _spec(request: pb.CreateGPUInstanceRequest, *, prefix: str) -> LaunchSpec:
    return requests.spec(
        image=request.image,
        env=dict(request.env),
        ports=list(request.ports),
        disk_gb=request.disk_gb,
        prefix=prefix,
    )
