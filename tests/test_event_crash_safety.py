"""The event stream across a PostgreSQL crash, and the positions it hands out.

After a crash PostgreSQL resumes transaction ids from what reached the WAL,
so ids of transactions that left nothing durable (they rolled back just
before the crash) are handed out again. No cursor the service gives out
may be passed by an event committed later (docs/events.md), so these tests
crash a durable server of their own and check that both a watcher that
stays connected and one resumed from a checkpointed heartbeat cursor get
every event written after the crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import grpc
import pytest

from booking.v1 import appointment_pb2 as apb
from service.server import BookingServer
from storage import embedded, migrate
from storage import events as events_store
from storage.database import Database
from storage.models import EventFilter, Position
from tests.population import insert_clients
from tests.support import Api, ServerConfig, hours_from_now

# The WAL writer writes the records of rolled-back transactions (and of
# asynchronous commits) within wal_writer_delay, 200 ms by default; after
# that an immediate shutdown no longer loses them. The longest delay allowed
# makes the window in which a crash forgets them seconds wide, so the
# scenario is reproducible. Autovacuum off: an ANALYZE committing in the
# window would flush them. And commits are asynchronous by default, as on a
# cluster tuned for speed: the service must make its own commits durable.
CRASH_SETTINGS = {"wal_writer_delay": "10s", "autovacuum": "off", "synchronous_commit": "off"}


def pg_ctl(pg: embedded.EmbeddedPostgres, *args: str) -> None:
    """Run pg_ctl on `pg` as the server's user."""
    embedded.pg_ctl(pg.pgdata, *args, timeout=90)


def crash_and_recover(pg: embedded.EmbeddedPostgres) -> None:
    """`pg_ctl restart -m immediate`: no shutdown checkpoint, no WAL flush;
    the restart runs crash recovery. Same options, so the same port."""
    log_file = str(pg.pgdata / "server.log")
    pg_ctl(pg, "-l", log_file, "-m", "immediate", "-w", "-t", "60", "restart")


@pytest.fixture
def durable_pg() -> Iterator[embedded.EmbeddedPostgres]:
    """A PostgreSQL of this test's own, with fsync on (the session's shared
    server runs without it)."""
    data_dir = Path(tempfile.mkdtemp(prefix="booking-crash-pg-"))
    pg = embedded.start(data_dir, max_connections=60)
    try:
        yield pg
    finally:
        try:
            pg_ctl(pg, "-m", "immediate", "-w", "stop")  # its data is thrown away
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


async def burn_xids(url: str, count: int) -> int:
    """Transactions that take an xid and roll back (as a failed hold does);
    returns the largest xid taken."""
    conn = await asyncpg.connect(url)
    try:
        largest = 0
        for _ in range(count):
            await conn.execute("BEGIN")
            largest = int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
            await conn.execute("ROLLBACK")
        return largest
    finally:
        await conn.close()


async def scalar(url: str, sql: str, *args: object) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


class Follower:
    """A consumer as the contract asks for: it keeps the last cursor it
    received (event or heartbeat) and, whenever its stream breaks with
    UNAVAILABLE, reconnects from that cursor."""

    def __init__(self, api: Api, request: apb.WatchAppointmentEventsRequest) -> None:
        self.api = api
        self.events: list[apb.AppointmentEvent] = []
        self.cursor = ""
        self.heartbeats: list[tuple[float, str]] = []  # (loop time received, cursor)
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._run(request))

    async def _run(self, request: apb.WatchAppointmentEventsRequest) -> None:
        loop = asyncio.get_running_loop()
        while True:
            call = self.api.appointments.WatchAppointmentEvents(request, metadata=self.api.md)
            try:
                async for message in call:
                    if message.WhichOneof("kind") == "event":
                        self.events.append(message.event)
                        self.cursor = message.event.cursor
                    else:
                        self.cursor = message.heartbeat.cursor
                        self.heartbeats.append((loop.time(), self.cursor))
                    self._arrived.set()
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(0.05)
            request = apb.WatchAppointmentEventsRequest(
                after_cursor=self.cursor, filter=request.filter
            )

    async def _wait(self, done: Callable[[], bool], what: str, wait: float) -> None:
        deadline = asyncio.get_running_loop().time() + wait
        while not done():
            if self._task.done():
                self._task.result()  # raises what ended it
                raise AssertionError("the watcher ended")
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, f"timed out waiting for {what}"
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.1)):
                    await self._arrived.wait()

    async def heartbeat_after(self, moment: float, wait: float = 10.0) -> str:
        """The cursor of the first heartbeat received after `moment`."""

        def later() -> list[str]:
            return [c for t, c in self.heartbeats if t > moment]

        await self._wait(lambda: bool(later()), "a heartbeat", wait)
        return later()[0]

    async def until_seen(self, ids: list[str], wait: float = 10.0) -> None:
        await self._wait(
            lambda: set(ids) <= {e.appointment.id for e in self.events},
            f"events of {ids}; got {[e.appointment.id for e in self.events]}",
            wait,
        )

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@asynccontextmanager
async def following(
    api: Api, request: apb.WatchAppointmentEventsRequest
) -> AsyncIterator[Follower]:
    follower = Follower(api, request)
    try:
        yield follower
    finally:
        await follower.close()


async def hold_until_up(api: Api, slot_id: str, wait: float = 20.0) -> apb.Appointment:
    """HoldSlot, retried while the service answers UNAVAILABLE (its pooled
    connections died with the crash)."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        try:
            return await api.hold(slot_id)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            assert asyncio.get_running_loop().time() < deadline, "the service did not recover"
            await asyncio.sleep(0.1)


async def crash_database(pg: embedded.EmbeddedPostgres) -> str:
    """A migrated database on `pg` with CRASH_SETTINGS; its URL."""
    admin = await asyncpg.connect(pg.url())
    try:
        for key, value in CRASH_SETTINGS.items():
            await admin.execute(f"ALTER SYSTEM SET {key} = '{value}'")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.execute("CREATE DATABASE booking")
    finally:
        await admin.close()
    url = pg.url("booking")
    await asyncio.to_thread(migrate.apply, url)
    return url


async def positions(url: str, appointment_ids: list[str]) -> list[str]:
    """Where the events of these appointments are in the log."""
    found = await scalar(
        url,
        "SELECT array_agg(xid::text || '-' || seq ORDER BY xid, seq)"
        " FROM appointment_events WHERE appointment_id = ANY($1::uuid[])",
        appointment_ids,
    )
    return list(found) if isinstance(found, list) else []


async def test_after_a_crash_connected_and_resumed_watchers_get_every_new_event(
    durable_pg: embedded.EmbeddedPostgres,
) -> None:
    url = await crash_database(durable_pg)
    # Fast tail polls and heartbeats: a heartbeat a little after the burned
    # xids reflects a read of the log made after them.
    config = ServerConfig.for_tests(url, heartbeat_seconds=0.1, event_poll_seconds=0.05)
    server = BookingServer(config)
    await server.start()
    try:
        async with Api.connect(server) as api:
            spec = await api.specialist()
            slots = [(await api.slot(spec.id, hours_from_now(10 + i))).id for i in range(20)]
            beginning = apb.WatchAppointmentEventsRequest(
                start_position=apb.WATCH_START_POSITION_BEGINNING
            )
            async with following(api, beginning) as connected:
                await connected.heartbeat_after(0)
                # A round misses the scenario only if the WAL writer happens
                # to write the burned xids between the heartbeat and the crash.
                reused = False
                for round_ in range(5):
                    before, *after = slots[4 * round_ : 4 * round_ + 4]
                    reused = await crash_round(durable_pg, url, api, connected, before, after)
                    if reused:
                        break
                # Otherwise this test tested nothing.
                assert reused, "crash recovery never handed out an xid again"
            delivered = [e.appointment.id for e in connected.events]
            assert len(delivered) == len(set(delivered)), "duplicates delivered"
    finally:
        await server.stop(grace=1)


async def crash_round(
    pg: embedded.EmbeddedPostgres,
    url: str,
    api: Api,
    connected: Follower,
    slot_before: str,
    slots_after: list[str],
) -> bool:
    """Deliver an event, burn xids, crash, write events; check every watcher
    got them. Returns whether recovery handed out a burned xid again."""
    loop = asyncio.get_running_loop()
    delivered = await api.hold(slot_before)
    await connected.until_seen([delivered.id])
    burned = await burn_xids(url, 40)
    # Let the tail reader read past the burned xids, then take the cursor a
    # consumer would checkpoint.
    checkpoint = await connected.heartbeat_after(loop.time() + 0.3)
    async with following(api, apb.WatchAppointmentEventsRequest()) as from_now:
        await from_now.heartbeat_after(0)  # its opening heartbeat: it is live
        await asyncio.to_thread(crash_and_recover, pg)
        assert await positions(url, [delivered.id]), "an event delivered before the crash is lost"
        new = [(await hold_until_up(api, slot)).id for slot in slots_after]
        resume = apb.WatchAppointmentEventsRequest(after_cursor=checkpoint)
        async with following(api, resume) as resumed:
            watchers = {
                "the connected watcher": connected,
                "the watcher started from now": from_now,
                f"the watcher resumed from heartbeat {checkpoint}": resumed,
            }
            outcomes = await asyncio.gather(
                *(w.until_seen(new) for w in watchers.values()), return_exceptions=True
            )
            missed = [n for n, o in zip(watchers, outcomes, strict=True) if o is not None]
            written = await positions(url, new)
            assert not missed, f"events written at {written} missed by {missed}"
            assert [e.appointment.id for e in resumed.events] == new
        assert [e.appointment.id for e in from_now.events] == new
    return int(written[0].split("-")[0]) <= burned


# Unit level: what read_after and stable_head hand out.


async def event_positions(url: str) -> list[Position]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT xid::text::bigint AS xid, seq FROM appointment_events ORDER BY xid, seq"
        )
    finally:
        await conn.close()
    return [Position(r["xid"], r["seq"]) for r in rows]


async def test_reads_hand_out_event_positions_never_the_horizon(
    api: Api, database_url: str
) -> None:
    assert api.server.db is not None
    db = api.server.db
    everything = EventFilter()
    assert await events_store.stable_head(db) == Position.start()
    assert await events_store.read_after(db, Position.start(), everything, 10) == (
        [],
        Position.start(),
        False,
    )

    spec, other = await api.specialist(), await api.specialist()
    held = [await api.hold((await api.slot(spec.id, hours_from_now(10 + i))).id) for i in range(3)]
    # Transactions that took an xid and rolled back: the horizon is now well
    # past the newest event, and positions must not follow it there.
    burned = await burn_xids(database_url, 20)
    log = await event_positions(database_url)
    assert len(log) == 3 and log[-1].xid < burned
    newest = log[-1]

    assert await events_store.stable_head(db) == newest
    events, reached, pending = await events_store.read_after(db, Position.start(), everything, 10)
    assert [e.position for e in events] == log and reached == newest and not pending
    # A full page: the last event read, and more may follow.
    events, reached, pending = await events_store.read_after(db, Position.start(), everything, 2)
    assert [e.position for e in events] == log[:2] and reached == log[1] and pending
    # Filtered reads still advance, to the newest event of the whole log.
    nothing = EventFilter(specialist_id=uuid.UUID(other.id))
    assert await events_store.read_after(db, Position.start(), nothing, 10) == ([], newest, False)
    first_only = EventFilter(appointment_id=uuid.UUID(held[0].id))
    events, reached, _ = await events_store.read_after(db, Position.start(), first_only, 10)
    assert [e.appointment.id for e in events] == [uuid.UUID(held[0].id)] and reached == newest
    assert await events_store.read_after(db, newest, everything, 10) == ([], newest, False)


async def test_an_open_transaction_keeps_handed_out_positions_below_it(
    api: Api, database_url: str
) -> None:
    assert api.server.db is not None
    db = api.server.db
    spec = await api.specialist()
    early, open_slot, late = [
        (await api.slot(spec.id, hours_from_now(10 + i))).id for i in range(3)
    ]
    (user_id,) = await insert_clients(database_url, 1)
    await api.hold(early)
    (before,) = await event_positions(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        tx = conn.transaction(isolation="repeatable_read")
        await tx.start()
        # Takes its xid now and commits only after a later transaction.
        await conn.fetchrow(
            "SELECT * FROM booking_hold_slot_v2($1, $2, 'NORMAL', NULL, '5 minutes', true, NULL, true)",
            uuid.UUID(open_slot),
            uuid.UUID(user_id),
        )
        await api.hold(late)
        # Committed, but above the open transaction: nothing handed out may
        # pass the open transaction's future event.
        assert await events_store.stable_head(db) == before
        events, reached, pending = await events_store.read_after(db, before, EventFilter(), 10)
        assert events == [] and reached == before and pending
        await tx.commit()
    finally:
        await conn.close()
    log = await event_positions(database_url)
    events, reached, pending = await events_store.read_after(db, before, EventFilter(), 10)
    assert [e.position for e in events] == log[1:] and reached == log[-1] and not pending


async def test_heartbeats_and_now_starts_carry_the_newest_event_position(
    api: Api, database_url: str
) -> None:
    spec, other = await api.specialist(), await api.specialist()
    await api.hold((await api.slot(spec.id, hours_from_now(10))).id)
    await burn_xids(database_url, 20)
    (newest,) = [f"{p.xid}-{p.seq}" for p in await event_positions(database_url)]
    async with following(api, apb.WatchAppointmentEventsRequest()) as from_now:
        assert await from_now.heartbeat_after(0) == newest
    # A filter that matches nothing: its heartbeats still move to the newest
    # event, and no further.
    request = apb.WatchAppointmentEventsRequest(
        start_position=apb.WATCH_START_POSITION_BEGINNING,
        filter=apb.AppointmentEventFilter(specialist_id=other.id),
    )
    async with following(api, request) as filtered:
        loop = asyncio.get_running_loop()
        assert await filtered.heartbeat_after(loop.time() + 0.6) == newest
        assert filtered.events == []


async def test_service_sessions_commit_durably_whatever_the_default(database_url: str) -> None:
    # The shared test server runs with synchronous_commit off.
    async def setting() -> str:
        db = await Database.connect(database_url, min_size=1, max_size=1)
        try:
            async with db.pool.acquire() as conn:
                return str(await conn.fetchval("SHOW synchronous_commit"))
        finally:
            await db.close()

    assert await scalar(database_url, "SELECT current_setting('synchronous_commit')") == "off"
    assert await setting() == "on"
    # A stricter level configured for the database is kept, not lowered.
    name = await scalar(database_url, "SELECT current_database()")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = remote_apply')
    finally:
        await conn.close()
    assert await setting() == "remote_apply"
