"""The gRPC server and its lifecycle.

Start: database (embedded unless DATABASE_URL), pool, event hub, gRPC
server, then migrations and health SERVING as soon as the database answers.
A server whose database is down at start-up keeps serving health
NOT_SERVING (booking calls answer UNAVAILABLE) and retries with backoff.
Afterwards a monitor probes the database with a bounded one-row query and
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
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from booking.v1 import (
    appointment_pb2,
    appointment_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    calendar_pb2,
    calendar_pb2_grpc,
    schedule_pb2,
    schedule_pb2_grpc,
    slot_pb2,
    slot_pb2_grpc,
    specialist_pb2,
    specialist_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
    waitlist_pb2,
    waitlist_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)
from service import connections, reflection, telemetry, webhooks
from service.auth import Authenticator
from service.calendar_feed import CalendarFeedServer
from service.config import Config
from service.event_hub import EventHub
from service.health import NOT_SERVING, SERVING, HealthService
from service.interceptor import ServiceInterceptor
from service.servicers.appointments import AppointmentService
from service.servicers.calendar import CalendarFeedService
from service.servicers.schedules import ScheduleService
from service.servicers.slots import SlotService
from service.servicers.specialists import SpecialistService
from service.servicers.users import AuthService, UserService
from service.servicers.waitlist import WaitlistService
from service.servicers.webhooks import WebhookService
from service.sweeper import sweep_forever
from storage import durability, embedded, migrate
from storage.database import Database
from storage.flights import SlotFlights

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    user_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
    specialist_pb2.DESCRIPTOR.services_by_name["SpecialistService"].full_name,
    slot_pb2.DESCRIPTOR.services_by_name["SlotService"].full_name,
    schedule_pb2.DESCRIPTOR.services_by_name["ScheduleService"].full_name,
    appointment_pb2.DESCRIPTOR.services_by_name["AppointmentService"].full_name,
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    waitlist_pb2.DESCRIPTOR.services_by_name["WaitlistService"].full_name,
    calendar_pb2.DESCRIPTOR.services_by_name["CalendarFeedService"].full_name,
    webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
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


@contextlib.asynccontextmanager
async def database(config: Config) -> AsyncIterator[str]:
    """The DSN to use: the configured one, or an embedded PostgreSQL's,
    started for the block and stopped after it if it was started here."""
    if config.database_url:
        yield config.database_url
        return
    pg = await asyncio.to_thread(embedded.start, Path(config.data_dir) / "postgres")
    try:
        yield pg.url("postgres")
    finally:
        if pg.started_here:
            await asyncio.to_thread(pg.stop)


def _webhook_settings(config: Config) -> webhooks.Settings:
    return webhooks.Settings(
        poll_seconds=config.webhook_poll_seconds,
        concurrency=config.webhook_concurrency,
        timeout_seconds=config.webhook_timeout_seconds,
        lease_seconds=config.webhook_lease_seconds,
        max_failures=config.webhook_max_failures,
        backoff_max_seconds=config.webhook_backoff_max_seconds,
    )


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class BookingServer:
    """Start and stop are composed from one AsyncExitStack: each part is
    entered in order and undone in reverse, on a failed start as on stop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.port: int | None = None
        self.db: Database | None = None
        # Holds of one slot reach the database one at a time from this
        # server (storage/flights.py): one coalescer per server, not per pool.
        self.hold_flights = SlotFlights()
        self._health = HealthService()
        self._interceptor: ServiceInterceptor | None = None
        self._hub: EventHub | None = None
        self._authenticator: Authenticator | None = None
        self._server: grpc.aio.Server | None = None
        self._resources: contextlib.AsyncExitStack | None = None
        self._grace = config.grace_seconds
        self._stopping: asyncio.Task[None] | None = None
        # Where /metrics is served (config.metrics_port, or the one picked for 0).
        self.metrics_port: int | None = None
        # Where calendar feeds are served (config.calendar_feed_port, or the one picked for 0).
        self.calendar_feed_port: int | None = None
        self.dispatcher: webhooks.Dispatcher | None = None
        self.database_up = False

    async def start(self) -> int:
        """Listen, and be SERVING if the database answers; if it does not,
        return anyway (NOT_SERVING) and keep trying in the background."""
        async with contextlib.AsyncExitStack() as stack:
            dsn = await stack.enter_async_context(database(self.config))
            # Deferred: it cannot fail while the database is down, and refuses
            # work (UNAVAILABLE) until _open_database has connected it.
            self.db = db = await Database.connect(
                dsn,
                min_size=self.config.pool_min_size,
                max_size=self.config.pool_max_size,
                deferred=True,
                reads=self.config.reads,
                commit_tolerance=self.config.commit_clock_tolerance_ms / 1000,
            )
            stack.push_async_callback(db.close)
            self._observe(stack, db)
            # Event reads are READ calls: with standbys serving reads, the
            # routing sends them there and their durability check to the
            # primary, and streams wake when the standby's replay moves
            # (LISTEN is refused on a standby).
            replay_poll = (
                None if self.config.reads is None else self.config.event_replay_poll_seconds
            )
            self._hub = hub = EventHub(
                db,
                poll_interval=self.config.event_poll_seconds,
                max_streams=self.config.max_streams,
                replay_poll=replay_poll,
            )
            if self.config.metrics_port is not None:
                endpoint = await asyncio.to_thread(
                    telemetry.serve_metrics,
                    self.config.host,
                    self.config.metrics_port,
                    self._gauges(db, hub),
                )
                stack.callback(endpoint.close)
                self.metrics_port = endpoint.port
                log.info(
                    "metrics at http://%s:%d/metrics",
                    self.config.host,
                    endpoint.port,
                    extra={"metrics_port": endpoint.port},
                )
            if self.config.calendar_feed_port is not None:
                feeds = CalendarFeedServer(db)
                # Worker processes share the port, as they share the gRPC one.
                self.calendar_feed_port = await feeds.start(
                    self.config.host,
                    self.config.calendar_feed_port,
                    reuse_port=self.config.workers > 1,
                )
                stack.push_async_callback(feeds.stop)
                log.info(
                    "calendar feeds at http://%s:%d/calendar/",
                    self.config.host,
                    self.calendar_feed_port,
                    extra={"calendar_feed_port": self.calendar_feed_port},
                )
            await hub.start()
            stack.push_async_callback(hub.stop)
            self._authenticator = authenticator = Authenticator(db, self.config)
            await authenticator.start()
            stack.push_async_callback(authenticator.stop)

            server = self._build(db, hub, authenticator)
            self._set_health(serving=False)
            self.port = self._bind(server)
            await server.start()
            self._server = server
            stack.push_async_callback(self._drain, server)

            ready = await self._open_database(attempt=1)
            tasks = [
                asyncio.create_task(
                    sweep_forever(
                        db,
                        interval=self.config.sweep_interval_seconds,
                        batch_size=self.config.sweep_batch_size,
                        on_release=hub.committed,
                        request_id_retention=self.config.request_id_retention,
                        event_retention=self.config.event_retention,
                    ),
                    name="hold-sweeper",
                ),
                asyncio.create_task(self._watch_database(ready), name="health-monitor"),
            ]
            stack.push_async_callback(_cancel_all, tasks)
            if self.config.webhooks:
                self.dispatcher = webhooks.Dispatcher(db, _webhook_settings(self.config))
                self.dispatcher.start()
                stack.push_async_callback(self.dispatcher.stop)
            # Undone first: stop advertising, and ask open streams to end.
            stack.callback(hub.close_streams)
            stack.callback(self._health.enter_graceful_shutdown)
            self._resources = stack.pop_all()
        log.info(
            "booking-service listening on %s:%d",
            self.config.host,
            self.port,
            extra={"host": self.config.host, "port": self.port},
        )
        return self.port

    def _observe(self, stack: contextlib.AsyncExitStack, db: Database) -> None:
        """Tracing when OTEL_* asks for it; the database's retry and span hooks."""
        remove_tracing = telemetry.tracing_from_env()
        if remove_tracing is not None:
            stack.callback(remove_tracing)
        db.span = telemetry.db_span
        db.on_retry = lambda cause: telemetry.metrics().db_retries.add(1, {"cause": cause})

    def _gauges(self, db: Database, hub: EventHub) -> dict[str, tuple[str, Callable[[], float]]]:
        return {
            "booking.streams.open": (
                "Open WatchAppointmentEvents streams",
                lambda: hub.active_streams,
            ),
            "booking.db.pool.size": ("Connections in the pool", lambda: db.pool.get_size()),
            "booking.db.pool.in_use": (
                "Pooled connections handed out",
                lambda: db.pool.get_size() - db.pool.get_idle_size(),
            ),
            "booking.db.pool.waiting": (
                "Calls waiting for a pooled connection",
                lambda: db.acquiring,
            ),
            "booking.database.up": (
                "1 while the database answers (health SERVING), else 0",
                lambda: 1 if self.database_up else 0,
            ),
            "booking.webhooks.backlog_age_seconds": (
                "Age of the oldest event this server is trying to deliver to a webhook"
                " endpoint it holds; 0 when caught up",
                lambda: self.dispatcher.backlog_age() if self.dispatcher else 0.0,
            ),
        }

    def _build(self, db: Database, hub: EventHub, authenticator: Authenticator) -> grpc.aio.Server:
        self._interceptor = ServiceInterceptor(authenticator)
        server = grpc.aio.server(
            interceptors=[self._interceptor],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Only worker processes share a port; otherwise a second
                # server on the same port must fail, not split the traffic.
                ("grpc.so_reuseport", 1 if self.config.workers > 1 else 0),
                *connections.server_options(self.config),
            ],
        )
        user_pb2_grpc.add_UserServiceServicer_to_server(
            UserService(db, self.config, authenticator), server
        )
        auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthService(authenticator), server)
        specialist_pb2_grpc.add_SpecialistServiceServicer_to_server(SpecialistService(db), server)
        # Creating slots may make waitlist offers: HELD events to announce.
        slot_pb2_grpc.add_SlotServiceServicer_to_server(
            SlotService(db, on_commit=hub.committed), server
        )
        schedule_pb2_grpc.add_ScheduleServiceServicer_to_server(
            ScheduleService(db, self.config, on_commit=hub.committed), server
        )
        waitlist_pb2_grpc.add_WaitlistServiceServicer_to_server(
            WaitlistService(db, self.config), server
        )
        appointment_pb2_grpc.add_AppointmentServiceServicer_to_server(
            AppointmentService(db, self.config, hub, authenticator, self.hold_flights), server
        )
        calendar_pb2_grpc.add_CalendarFeedServiceServicer_to_server(CalendarFeedService(db), server)
        webhook_pb2_grpc.add_WebhookServiceServicer_to_server(WebhookService(db), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable(server, [*SERVICE_NAMES, health.SERVICE_NAME])
        return server

    async def _open_database(self, attempt: int) -> bool:
        """One try at readiness: the database answers, migrations are
        applied (when configured), the pool is connected. Then SERVING."""
        assert self.db is not None
        try:
            if not await self.db.ping(HEALTH_PROBE_TIMEOUT_SECONDS):
                raise ConnectionError("no answer to the probe query")
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
        await durability.warn_if_unreplicated(self.db)
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
        self.database_up = serving
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
            if grace is not None:
                self._grace = grace
            self._stopping = asyncio.create_task(self._stop())
        return self._stopping

    async def _drain(self, server: grpc.aio.Server) -> None:
        await self._let_in_received_calls(min(self._grace, SHUTDOWN_DRAIN_MAX_SECONDS))
        await server.stop(self._grace)

    async def _stop(self) -> None:
        resources, self._resources = self._resources, None
        if resources is None:
            # Never started (start-up failed and undid itself): the one line
            # saying why is all an operator should see, no "stopped" after it.
            return
        await resources.aclose()
        log.info("booking-service stopped")
