"""grpc.health.v1.Health: Check, Watch and List.

Our own instead of grpcio-health-checking's asyncio servicer, which does not
implement List and whose Watch writes with ``context.write`` (outside the
interceptor's streaming wrapper). The statuses live in one dict; watchers
wait on an event that is replaced at every change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from grpc_health.v1 import health_pb2

from service.errors import ShuttingDown
from service.grpc_types import Context
from storage.errors import NotFound

Status: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@dataclass(eq=False)
class UnknownService(NotFound):
    reason: ClassVar[str] = "SERVICE_NOT_FOUND"
    resource: ClassVar[str] = "service"


class HealthService:
    """Registered with health_pb2_grpc.add_HealthServicer_to_server."""

    def __init__(self) -> None:
        self._statuses: dict[str, Status] = {}
        self._changed = asyncio.Event()
        self._shutting_down = False

    def set(self, service: str, status: Status) -> None:
        """Record `service`'s status (ignored once shutdown has begun)."""
        if self._shutting_down or self._statuses.get(service) == status:
            return
        self._statuses[service] = status
        self._notify()

    def enter_graceful_shutdown(self) -> None:
        """Everything NOT_SERVING for good; open Watch streams end after
        telling their client so."""
        for service in self._statuses:
            self._statuses[service] = NOT_SERVING
        self._shutting_down = True
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            raise UnknownService(id=request.service)
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: Context
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._statuses.items()
            }
        )

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: Status | None = None
        while True:
            changed = self._changed
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self._shutting_down:
                raise ShuttingDown()
            await changed.wait()
