"""B3's server process: `GPUProxyService/Ping` answered by echoing, nothing behind it.

Same service, messages and server options as the gateway, on uvloop like the gateway: what
is left is the cost of gRPC itself. Run as `python -m bench.grpc_echo_server PORT`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import grpc
import uvloop

from gateway.pb import gpuproxy_pb2 as pb

# The gateway's own options, so the floor is measured under the same settings.
SERVER_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
SERVICE = pb.DESCRIPTOR.services_by_name["GPUProxyService"].full_name


async def ping(
    request: pb.PingRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> pb.PingResponse:
    return pb.PingResponse(message=request.message, worker_kind="echo", worker_id="echo", attempt=1)


def add_echo(server: grpc.aio.Server) -> None:
    """Ping alone, registered the way the generated `add_..._to_server` registers methods
    (the registered-method table as well: grpc's faster lookup, which the gateway gets)."""
    handlers = {
        "Ping": grpc.unary_unary_rpc_method_handler(
            ping,
            request_deserializer=pb.PingRequest.FromString,
            response_serializer=pb.PingResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def serve(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_echo(server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    watcher = asyncio.create_task(_watch_parent(os.getppid(), stop))
    await stop.wait()
    watcher.cancel()
    await server.stop(1.0)


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    # The bench may be killed outright; the server must not outlive it.
    while os.getppid() == parent:  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    stop.set()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
