"""The provisioner worker application."""

from __future__ import annotations

from faststream import FastStream

from schemas.commands import Ping
from schemas.subjects import WorkerKind
from workers.common.app import worker_app
from workers.common.config import WorkerConfig
from workers.common.ping import answer_ping


def build(config: WorkerConfig) -> FastStream:
    return worker_app(WorkerKind.PROVISIONER, {Ping: answer_ping}, config)
