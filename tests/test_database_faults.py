"""The database going away is UNAVAILABLE, never INTERNAL or UNKNOWN.

Pooled connections whose backends were terminated, and a PostgreSQL this
module owns restarted under traffic: every answer is OK, UNAVAILABLE or a
legitimate business refusal, the broken connections leave the pool, and the
service works again afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from booking.v1 import appointment_pb2 as apb
from booking.v1 import slot_pb2 as spb
from booking.v1 import slot_pb2_grpc
from service import server as server_module
from service.server import BookingServer
from storage import embedded, migrate
from storage.models import Role
from tests.support import Api, ServerConfig, hours_from_now, running_server, ts

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _code(outcome: object, allowed: set[grpc.StatusCode]) -> grpc.StatusCode:
    if isinstance(outcome, grpc.aio.AioRpcError):
        code = outcome.code()
        assert code in allowed, f"{code}: {outcome.details()}"
        return code
    if isinstance(outcome, BaseException):
        raise outcome
    return OK


async def _terminate_pool_backends(admin_url: str, database_url: str) -> int:
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(admin_url)
    try:
        return int(
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND application_name = 'booking-service'",
                name,
            )
        )
    finally:
        await admin.close()


class Traffic:
    """Concurrent reads and holds until stopped, counting answers by code."""

    def __init__(self, api: Api, specialist_id: str, slot_ids: list[str], user_id: str) -> None:
        self.api = api
        self.specialist_id = specialist_id
        self.slot_ids = iter(slot_ids)
        self.read_slot = slot_ids[0]
        self.user_id = user_id
        self.codes: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, workers: int) -> None:
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _run(self, worker: int) -> None:
        api, md = self.api, self.api.md
        reads = {OK, UNAVAILABLE}
        # A hold answered UNAVAILABLE may have committed; a later hold of the
        # same slot is never made, so only OK and UNAVAILABLE are expected.
        holds = {OK, UNAVAILABLE}
        for n in itertools.count():
            if self._stop.is_set():
                return
            calls: list[tuple[str, Awaitable[object], set[grpc.StatusCode]]] = [
                (
                    "GetSlot",
                    api.slots.GetSlot(
                        spb.GetSlotRequest(id=self.read_slot), metadata=md, timeout=10
                    ),
                    reads,
                ),
                (
                    "ListSlots",
                    api.slots.ListSlots(
                        spb.ListSlotsRequest(specialist_id=self.specialist_id),
                        metadata=md,
                        timeout=10,
                    ),
                    reads,
                ),
            ]
            slot_id = next(self.slot_ids, None) if worker % 2 == 0 and n % 2 == 0 else None
            if slot_id is not None:
                request = apb.HoldSlotRequest(slot_id=slot_id, user_id=self.user_id)
                calls.append(
                    ("HoldSlot", api.appointments.HoldSlot(request, metadata=md, timeout=10), holds)
                )
            outcomes = await asyncio.gather(*(c for _, c, _ in calls), return_exceptions=True)
            for (name, _, allowed), outcome in zip(calls, outcomes, strict=True):
                self.codes[f"{name} {_code(outcome, allowed).name}"] += 1


async def _traffic(api: Api, slots: int) -> Traffic:
    specialist = await api.specialist()
    start = hours_from_now(48)
    request = spb.BatchCreateSlotsRequest(
        requests=[
            spb.CreateSlotRequest(
                specialist_id=specialist.id,
                start_time=ts(start + timedelta(minutes=30 * i)),
                end_time=ts(start + timedelta(minutes=30 * i + 30)),
            )
            for i in range(slots)
        ]
    )
    reply = await api.slots.BatchCreateSlots(request, metadata=api.md)
    user_id, _ = await api.make_user(Role.CLIENT)
    return Traffic(api, specialist.id, [s.id for s in reply.slots], user_id)


async def test_terminated_pool_connections_answer_unavailable_then_recover(
    api: Api, pg_admin_url: str, database_url: str
) -> None:
    traffic = await _traffic(api, slots=400)
    traffic.start(workers=12)
    killed = 0
    try:
        for _ in range(40):
            await asyncio.sleep(0.05)
            killed += await _terminate_pool_backends(pg_admin_url, database_url)
    finally:
        await traffic.stop()
    assert killed > 0 and traffic.codes["GetSlot OK"] > 0
    # The broken connections left the pool: everything works again.
    for _ in range(30):
        await api.slots.GetSlot(spb.GetSlotRequest(id=traffic.read_slot), metadata=api.md)


# --- a PostgreSQL of our own, restarted under traffic -------------------------


class OwnPostgres:
    """A durable PostgreSQL in a temp dir that tests may restart or stop."""

    def __init__(self, server: embedded.EmbeddedPostgres) -> None:
        self.server = server

    def url(self, database: str = "postgres") -> str:
        return self.server.url(database)

    def pg_ctl(self, *args: str) -> None:
        embedded.pg_ctl(self.server.pgdata, *args)

    def restart(self, mode: str) -> None:
        # restart reuses the recorded command line, so the port stays the same.
        self.pg_ctl("-m", mode, "-w", "-t", "60", "restart", "-l", str(self.log))

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "-w", "stop")

    def start(self) -> None:
        options = f"-p {self.server.port} -h 127.0.0.1 -k {self.server.pgdata}"
        self.pg_ctl("-o", options, "-l", str(self.log), "-w", "-t", "60", "start")

    @property
    def log(self) -> Path:
        return self.server.pgdata / "server.log"


@pytest.fixture(scope="module")
def own_pg() -> Iterator[OwnPostgres]:
    data_dir = Path(tempfile.mkdtemp(prefix="booking-fault-pg-"))
    pg = OwnPostgres(embedded.start(data_dir, max_connections=100))
    try:
        yield pg
    finally:
        try:
            pg.stop()
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def own_database(own_pg: OwnPostgres) -> AsyncIterator[str]:
    name = f"booking_fault_{next(_databases)}"
    conn = await asyncpg.connect(own_pg.url())
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    url = own_pg.url(name)
    await asyncio.to_thread(migrate.apply, url)
    yield url


_databases = itertools.count()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restarts_under_traffic_answer_unavailable_then_recover(
    own_pg: OwnPostgres, own_database: str, mode: str
) -> None:
    async with running_server(own_database) as server:
        async with Api.connect(server) as api:
            traffic = await _traffic(api, slots=600)
            traffic.start(workers=8)
            try:
                await asyncio.sleep(0.3)
                await asyncio.to_thread(own_pg.restart, mode)
                await asyncio.sleep(0.5)
            finally:
                await traffic.stop()
            assert traffic.codes["GetSlot OK"] > 0
            # Back to normal without a restart of the service.
            request = spb.GetSlotRequest(id=traffic.read_slot)
            for _ in range(100):
                try:
                    await api.slots.GetSlot(request, metadata=api.md, timeout=5)
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == UNAVAILABLE, err.details()
                    await asyncio.sleep(0.1)
            for _ in range(20):
                await api.slots.GetSlot(request, metadata=api.md, timeout=5)
            assert await api.hold(traffic.slot_ids.__next__(), user_id=traffic.user_id)


# --- health follows a stalled database; start-up waits for a missing one -----


def _cluster_pids(pg: OwnPostgres) -> list[int]:
    """The postmaster of `pg` and its children (only processes we started)."""
    postmaster = int((pg.server.pgdata / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
            pids.append(int(entry.name))
    return pids


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        return int(reply.status)


async def _wait_for_health(port: int, want: int, seconds: float) -> float:
    started = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - started < seconds:
        if await _health(port) == want:
            return asyncio.get_running_loop().time() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"health did not become {want} within {seconds} s")


async def test_health_is_not_serving_while_the_database_is_stopped_with_sigstop(
    own_pg: OwnPostgres,
    own_database: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(server_module, "HEALTH_CHECK_SECONDS", 0.2)
    caplog.set_level(logging.INFO)
    server = BookingServer(ServerConfig.for_tests(own_database))
    await server.start()
    assert server.port is not None
    stopped: list[int] = []
    try:
        assert await _health(server.port) == SERVING
        for pid in _cluster_pids(own_pg):
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        # The probe times out (2 s) instead of waiting forever.
        await _wait_for_health(server.port, NOT_SERVING, seconds=8)
        await asyncio.sleep(3)  # probes keep timing out meanwhile
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped.clear()
        await _wait_for_health(server.port, SERVING, seconds=10)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        await server.stop(grace=1)
    # Timed-out probes leave nothing behind that asyncio would log.
    assert not [r.getMessage()[:200] for r in caplog.records if r.exc_info]


async def test_a_server_started_while_the_database_is_down_waits_for_it(
    own_pg: OwnPostgres, own_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "START_RETRY_MAX_SECONDS", 0.5)
    await asyncio.to_thread(own_pg.stop)
    server = BookingServer(ServerConfig.for_tests(own_database, migrate_on_start=True))
    try:
        await server.start()
        assert server.port is not None
        assert await _health(server.port) == NOT_SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await slot_pb2_grpc.SlotServiceStub(channel).GetSlot(
                    spb.GetSlotRequest(id="00000000-0000-4000-8000-000000000000"),
                    metadata=[("authorization", "Bearer bk_whatever")],
                    timeout=5,
                )
        assert refused.value.code() == UNAVAILABLE
        await asyncio.to_thread(own_pg.start)
        await _wait_for_health(server.port, SERVING, seconds=20)
        async with Api.connect(server) as api:
            specialist = await api.specialist()
            slot = await api.slot(specialist.id, hours_from_now(10))
            assert (await api.hold(slot.id, user_id=(await api.make_user(Role.CLIENT))[0])).id
    finally:
        await server.stop(grace=1)
        if not (own_pg.server.pgdata / "postmaster.pid").exists():
            await asyncio.to_thread(own_pg.start)


def test_serve_with_workers_waits_for_a_database_that_is_down(
    own_pg: OwnPostgres, own_database: str
) -> None:
    own_pg.stop()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {**os.environ, "DATABASE_URL": own_database, "BOOKING_PORT": str(port)}
    parent = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--workers", "2"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert asyncio.run(_poll_health(port, NOT_SERVING, parent)) == NOT_SERVING
        own_pg.start()
        assert asyncio.run(_poll_health(port, SERVING, parent)) == SERVING
    finally:
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(timeout=30)
        stderr = parent.stderr.read().decode() if parent.stderr else ""
        if not (own_pg.server.pgdata / "postmaster.pid").exists():
            own_pg.start()
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr


async def _poll_health(port: int, want: int, proc: subprocess.Popen[bytes]) -> int:
    status = -1
    for _ in range(300):
        assert proc.poll() is None, "serve exited while the database was down"
        try:
            status = await _health(port)
        except grpc.aio.AioRpcError:
            status = -1  # not listening yet
        if status == want:
            return status
        await asyncio.sleep(0.1)
    return status


@pytest.mark.parametrize(
    ("exc", "gone", "unsent"),
    [
        (asyncpg.InternalClientError("cannot switch to state 12; another operation"), True, True),
        (asyncpg.exceptions.ProtocolError("unexpected message"), True, False),
        (asyncpg.ConnectionDoesNotExistError("closed in the middle of operation"), True, False),
        (asyncpg.InterfaceError("cannot perform operation: connection is closed"), True, True),
        (ConnectionResetError(), True, False),
        (TimeoutError(), True, False),
        (asyncpg.AdminShutdownError("terminating connection"), True, False),
        (asyncpg.CannotConnectNowError("the database system is starting up"), True, False),
        (asyncpg.TooManyConnectionsError("too many clients"), True, False),
        (asyncpg.UniqueViolationError("duplicate key"), False, False),
        (asyncpg.SerializationError("could not serialize"), False, False),
        (asyncpg.exceptions.OutdatedSchemaCacheError("cached plan"), False, False),
        (ValueError("a bug"), False, False),
    ],
)
def test_what_counts_as_the_database_going_away(
    exc: BaseException, gone: bool, unsent: bool
) -> None:
    from storage.database import _nothing_sent, went_away

    assert went_away(exc) is gone
    assert _nothing_sent(exc) is unsent
