"""The gRPC server and its lifecycle.

Start: database (embedded unless DATABASE_URL), pool, event hub, gRPC
server, then migrations and health SERVING as soon as the database answers.
A server whose database is down at start-up keeps serving health
NOT_SERVING (booking calls answer UNAVAILABLE) and retries with backoff.
Afterwards a monitor probes the database with a bounded ``SELECT 1`` and
flips health as it comes and goes.

Stop (SIGTERM/SIGINT, safe to call twice): health NOT_SERVING, open streams
told to end, calls already received are let in, server.stop(grace) drains
in-flight calls, background tasks stop, then the pool closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
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
from service.health import NOT_SERVING, SERVING, HealthService
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
# A probe that gets no answer within this long means a stalled database.
HEALTH_PROBE_TIMEOUT_SECONDS = 2.0
# Start-up retries while the database is down: 0.25 s doubling up to 5 s.
START_RETRY_FIRST_SECONDS = 0.25
START_RETRY_MAX_SECONDS = 5.0
# On shutdown, calls the transport already received are let in until no new
# one has started for QUIET seconds (at most DRAIN_MAX): grpc's stop() would
# cancel those that no handler has picked up yet.
SHUTDOWN_QUIET_SECONDS = 0.05
SHUTDOWN_DRAIN_MAX_SECONDS = 1.0


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
        self._health = HealthService()
        self._interceptor: ServiceInterceptor | None = None
        self._hub: EventHub | None = None
        self._authenticator: Authenticator | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen, and be SERVING if the database answers; if it does not,
        return anyway (NOT_SERVING) and keep trying in the background."""
        dsn, self._embedded = await resolve_database(self.config)
        # Deferred: it cannot fail while the database is down, and refuses
        # work (UNAVAILABLE) until _open_database has connected it.
        self.db = db = await Database.connect(
            dsn,
            min_size=self.config.pool_min_size,
            max_size=self.config.pool_max_size,
            deferred=True,
        )
        self._hub = hub = EventHub(
            db, poll_interval=self.config.event_poll_seconds, max_streams=self.config.max_streams
        )
        await hub.start()
        self._authenticator = authenticator = Authenticator(db, self.config)
        await authenticator.start()

        self._interceptor = ServiceInterceptor(authenticator)
        server = grpc.aio.server(
            interceptors=[self._interceptor],
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
        self._set_health(serving=False)
        self.port = self._bind(server)
        await server.start()
        self._server = server
        ready = await self._open_database(attempt=1)
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
            asyncio.create_task(self._watch_database(ready), name="health-monitor"),
        ]
        log.info("booking-service listening on %s:%d", self.config.host, self.port)
        return self.port

    async def _open_database(self, attempt: int) -> bool:
        """One try at readiness: the database answers, migrations are
        applied (when configured), the pool is connected. Then SERVING."""
        assert self.db is not None
        try:
            if not await self.db.ping(HEALTH_PROBE_TIMEOUT_SECONDS):
                raise ConnectionError("no answer to SELECT 1")
            if self.config.migrate_on_start:
                await asyncio.to_thread(migrate.apply, self.db.dsn)
            await self.db.open()
        except Exception as exc:  # noqa: BLE001 - retried; one line per attempt
            log.warning(
                "database not ready (attempt %d): %s",
                attempt,
                (str(exc).strip().splitlines() or [type(exc).__name__])[0],
            )
            return False
        self._set_health(serving=True)
        if attempt > 1:
            log.info("database ready after %d attempts", attempt)
        return True

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

    def _set_health(self, *, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ["", *SERVICE_NAMES]:
            self._health.set(name, status)

    async def _watch_database(self, ready: bool) -> None:
        """Until ready, retry start-up with backoff; then NOT_SERVING while
        the database is unreachable or stalled, SERVING again after."""
        assert self.db is not None
        attempt, delay = 1, START_RETRY_FIRST_SECONDS
        while not ready:
            await asyncio.sleep(delay)
            attempt += 1
            delay = min(delay * 2, START_RETRY_MAX_SECONDS)
            ready = await self._open_database(attempt)
        serving = True
        while True:
            await asyncio.sleep(HEALTH_CHECK_SECONDS)
            ok = await self.db.ping(HEALTH_PROBE_TIMEOUT_SECONDS)
            if ok != serving:
                serving = ok
                log.warning("database %s", "reachable again" if ok else "unreachable")
                self._set_health(serving=ok)

    async def _let_in_received_calls(self, limit: float) -> None:
        """Wait until no call has started for SHUTDOWN_QUIET_SECONDS (at
        most `limit`): calls sent just before the signal, already received
        but not yet handed to a handler, are served instead of cancelled."""
        deadline = time.monotonic() + limit
        while self._interceptor is not None:
            now = time.monotonic()
            quiet_at = self._interceptor.last_call_started + SHUTDOWN_QUIET_SECONDS
            if quiet_at <= now or now >= deadline:
                return
            await asyncio.sleep(min(quiet_at, deadline) - now)

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
        self._health.enter_graceful_shutdown()
        if self._hub is not None:
            self._hub.close_streams()
        if self._server is not None:
            await self._let_in_received_calls(min(grace, SHUTDOWN_DRAIN_MAX_SECONDS))
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
