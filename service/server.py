"""The gRPC server and its lifecycle.

Start: database (embedded unless DATABASE_URL), migrations, pool, event
hub, gRPC server, health SERVING. Stop (SIGTERM/SIGINT, safe to call twice):
health NOT_SERVING, open streams told to end, server.stop(grace) drains
in-flight calls, background tasks stop, then the pool closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from booking.v1 import (
    appointment_pb2,
    appointment_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    slot_pb2,
    slot_pb2_grpc,
    specialist_pb2,
    specialist_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from service.auth import Authenticator
from service.config import Config
from service.event_hub import EventHub
from service.interceptor import ServiceInterceptor
from service.servicers.appointments import AppointmentService
from service.servicers.slots import SlotService
from service.servicers.specialists import SpecialistService
from service.servicers.users import AuthService, UserService
from service.sweeper import sweep_forever
from storage import embedded, migrate
from storage.database import Database

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    user_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
    specialist_pb2.DESCRIPTOR.services_by_name["SpecialistService"].full_name,
    slot_pb2.DESCRIPTOR.services_by_name["SlotService"].full_name,
    appointment_pb2.DESCRIPTOR.services_by_name["AppointmentService"].full_name,
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
HEALTH_CHECK_SECONDS = 2.0


async def resolve_database(config: Config) -> tuple[str, embedded.EmbeddedPostgres | None]:
    """The DSN to use, starting the embedded server when none is configured."""
    if config.database_url:
        return config.database_url, None
    pg = await asyncio.to_thread(embedded.start, Path(config.data_dir) / "postgres")
    return pg.url("postgres"), pg


class BookingServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.port: int | None = None
        self.db: Database | None = None
        self._embedded: embedded.EmbeddedPostgres | None = None
        self._server: grpc.aio.Server | None = None
        # grpc-stubs has no grpc_health.v1.health.aio (the asyncio servicer).
        self._health: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._hub: EventHub | None = None
        self._authenticator: Authenticator | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> int:
        dsn, self._embedded = await resolve_database(self.config)
        if self.config.migrate_on_start:
            await asyncio.to_thread(migrate.apply, dsn)
        self.db = db = await Database.connect(
            dsn, min_size=self.config.pool_min_size, max_size=self.config.pool_max_size
        )
        self._hub = hub = EventHub(
            db, poll_interval=self.config.event_poll_seconds, max_streams=self.config.max_streams
        )
        await hub.start()
        self._authenticator = authenticator = Authenticator(db, self.config)
        await authenticator.start()

        server = grpc.aio.server(
            interceptors=[ServiceInterceptor(authenticator)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Only worker processes share a port; otherwise a second
                # server on the same port must fail, not split the traffic.
                ("grpc.so_reuseport", 1 if self.config.workers > 1 else 0),
            ],
        )
        user_pb2_grpc.add_UserServiceServicer_to_server(
            UserService(db, self.config, authenticator), server
        )
        auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthService(authenticator), server)
        specialist_pb2_grpc.add_SpecialistServiceServicer_to_server(SpecialistService(db), server)
        slot_pb2_grpc.add_SlotServiceServicer_to_server(SlotService(db), server)
        appointment_pb2_grpc.add_AppointmentServiceServicer_to_server(
            AppointmentService(db, self.config, hub, authenticator), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self.port = self._bind(server)
        await server.start()
        self._server = server
        await self._set_health(serving=True)
        self._tasks = [
            asyncio.create_task(
                sweep_forever(
                    db,
                    interval=self.config.sweep_interval_seconds,
                    batch_size=self.config.sweep_batch_size,
                    on_release=hub.committed,
                    request_id_retention=self.config.request_id_retention,
                ),
                name="hold-sweeper",
            ),
            asyncio.create_task(self._watch_database(), name="health-monitor"),
        ]
        log.info("booking-service listening on %s:%d", self.config.host, self.port)
        return self.port

    def _bind(self, server: grpc.aio.Server) -> int:
        address = self.config.address
        if self.config.tls_cert is None or self.config.tls_key is None:
            port = server.add_insecure_port(address)
        else:
            client_ca = (
                self.config.tls_client_ca.read_bytes() if self.config.tls_client_ca else None
            )
            credentials = grpc.ssl_server_credentials(
                [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        return port

    async def _set_health(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *SERVICE_NAMES]:
            await self._health.set(name, status)

    async def _watch_database(self) -> None:
        """NOT_SERVING while the database is unreachable, SERVING again after."""
        assert self.db is not None
        serving = True
        while True:
            await asyncio.sleep(HEALTH_CHECK_SECONDS)
            ok = await self.db.ping()
            if ok != serving:
                serving = ok
                log.warning("database %s", "reachable again" if ok else "unreachable")
                await self._set_health(serving=ok)

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    def stop(self, grace: float | None = None) -> asyncio.Task[None]:
        """Shut down; every call returns the same task, so calling twice is safe."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(
                self._stop(self.config.grace_seconds if grace is None else grace)
            )
        return self._stopping

    async def _stop(self, grace: float) -> None:
        for task in self._tasks:
            task.cancel()
        await self._health.enter_graceful_shutdown()
        if self._hub is not None:
            self._hub.close_streams()
        if self._server is not None:
            await self._server.stop(grace)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._hub is not None:
            await self._hub.stop()
        if self._authenticator is not None:
            await self._authenticator.stop()
        if self.db is not None:
            await self.db.close()
        if self._embedded is not None and self._embedded.started_here:
            await asyncio.to_thread(self._embedded.stop)
        log.info("booking-service stopped")
