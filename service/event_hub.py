"""Fan-out of the appointment event log to WatchAppointmentEvents streams.

One tail reader per server process follows the table (woken by NOTIFY,
polling as a fallback) and keeps the newest events in a bounded ring. A
stream whose cursor falls inside the ring is served from memory; one that
is further behind (a resume from an old cursor, or a consumer so slow the
ring moved past it) reads the table directly until it catches up. So
memory stays bounded however many streams there are or however slow they
are, and the database sees one tail query per wake-up, not one per stream.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from service.errors import ShuttingDown, TooManyStreams
from storage import events as store
from storage.database import Database
from storage.errors import (
    CursorCompacted,
    CursorNotInHistory,
    DatabaseTimeout,
    DatabaseUnavailable,
)
from storage.listener import KeptListener
from storage.models import AppointmentEvent, EventFilter, Position

log = logging.getLogger(__name__)

# Reads of the log and NOTIFYs are at most one per PACE seconds: a burst of
# commits shares them, for at most this much added latency.
PACE = 0.002


def pace_delay(now: float, last_start: float) -> float:
    """How long a read woken at `now` waits, the previous one having
    started at `last_start`: none after a quiet spell (a commit's event is
    read at once), the rest of PACE during a burst (its commits share the
    next read). Sleeping PACE before every read added 2 ms to every event,
    more on a busy event loop."""
    return max(0.0, last_start + PACE - now)


async def wait_up_to(event: asyncio.Event, seconds: float) -> None:
    """Wait for `event`, at most `seconds`.

    Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that
    arrives as the event fires, which left a cancelled loop running (a hung
    shutdown, seen in tests). asyncio.timeout counts cancellations properly.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class StreamGuard(Protocol):
    """Decides whether a stream may go on (service.auth.StreamGuard)."""

    # Set when `check` must run before the stream sends anything more.
    attention: bool

    async def check(self) -> None:
        """Return to go on; raise to end the stream with that error."""


# A listener that cannot connect within this long is given up for this round.
LISTEN_CONNECT_SECONDS = 5.0
# The listener proves itself with a round trip this often; until a lost one
# is back, the tail polls (every poll interval), so nothing is missed.
LISTEN_PING_SECONDS = 5.0


class _Outage:
    """Logs the first failure of an outage, and its end, but not every
    retry in between."""

    def __init__(self, recovered: str) -> None:
        self.ongoing = False
        self.recovered = recovered

    def report(self, message: str, *args: object) -> None:
        if not self.ongoing:
            self.ongoing = True
            log.warning(message, *args)

    def over(self) -> None:
        if self.ongoing:
            self.ongoing = False
            log.info(self.recovered)


@dataclass(frozen=True)
class Heartbeat:
    position: Position
    time: datetime


class EventHub:
    def __init__(
        self,
        db: Database,
        *,
        poll_interval: float,
        max_streams: int,
        ring_size: int = 4096,
        batch_size: int = 500,
        gate: Database | None = None,
        replay_poll: float | None = None,
    ) -> None:
        """`db` is where the log is read: the primary, or a hot standby.
        Reading a standby, `gate` is the primary (the durability gate runs
        there, and NOTIFY goes through it; `db` itself when None), and
        `replay_poll` the seconds between looks at the standby's replay
        position, its wake-up in place of LISTEN (docs/events.md, "Reading
        from a standby"). None: wake-ups by NOTIFY only."""
        self.db = db
        self.gate = gate
        self.replay_poll = replay_poll
        self.poll_interval = poll_interval
        self.max_streams = max_streams
        self.ring_size = ring_size
        self.batch_size = batch_size
        self.active_streams = 0
        self._events: list[AppointmentEvent] = []
        # The ring holds every event in (floor, head].
        self._floor = Position.start()
        self._head = Position.start()
        # Streams waiting for news; `_generation` counts the wake-ups, so a
        # stream that looked before one does not wait for the next.
        self._waiters: set[asyncio.Future[None]] = set()
        self._generation = 0
        self._poke = asyncio.Event()
        self._closing = asyncio.Event()
        self._announce_wanted = asyncio.Event()
        self._idle = True
        self._task: asyncio.Task[None] | None = None
        self._announcer: asyncio.Task[None] | None = None
        self._read_outage = _Outage("reading appointment events again")
        self._listen_outage = _Outage("listening for events again")
        self._listener = KeptListener(
            (gate or db).dsn,
            store.CHANNEL,
            lambda _: self._poke.set(),
            application_name="booking-listener",
            ping_every=LISTEN_PING_SECONDS,
            ping_timeout=LISTEN_CONNECT_SECONDS,
            connect_within=LISTEN_CONNECT_SECONDS,
            # Retried as often as the tail polls meanwhile.
            retry_after=poll_interval,
            max_backoff=poll_interval,
            # Notifications may have been missed: read the table now.
            on_lost=self._poke.set,
            on_up=self._listen_outage.over,
            on_unreachable=lambda exc: self._listen_outage.report(
                "cannot LISTEN for events; polling every %.1fs", self.poll_interval
            ),
        )
        self._keeper: asyncio.Task[None] | None = None
        self._replay_watcher: asyncio.Task[None] | None = None
        self._replay_outage = _Outage("reading the standby's replay position again")

    async def start(self) -> None:
        # The ring starts (from the newest stable event) when the first stream opens.
        self._task = asyncio.create_task(self._tail(), name="event-hub-tail")
        self._announcer = asyncio.create_task(self._announce(), name="event-hub-announcer")
        self._keeper = asyncio.create_task(self._listener.run(), name="event-hub-listener")
        if self.replay_poll is not None:
            self._replay_watcher = asyncio.create_task(
                self._watch_replay(self.replay_poll), name="event-hub-replay"
            )

    async def _watch_replay(self, every: float) -> None:
        # LISTEN is refused on a standby, and a NOTIFY from the primary can
        # arrive before the standby has replayed the commit: the standby's
        # own replay position moving is the wake-up. One tiny local query
        # per interval, only while someone watches.
        seen: str | None = None
        while True:
            await asyncio.sleep(every)
            if self.active_streams == 0:
                continue
            try:
                position = await store.replay_position(self.db)
            except Exception as exc:  # noqa: BLE001 - the tail's own poll covers it
                self._replay_outage.report("reading the standby's replay position: %s", exc)
                continue
            self._replay_outage.over()
            if position != seen:
                seen = position
                self._poke.set()

    def committed(self) -> None:
        """Called after a transition commits: wake this server's tail reader
        at once, and the other replicas' through NOTIFY."""
        self._poke.set()
        self._announce_wanted.set()

    async def _announce(self) -> None:
        # One NOTIFY in flight at a time, and at most one per PACE seconds:
        # commits that land meanwhile share the next one.
        while True:
            await self._announce_wanted.wait()
            await asyncio.sleep(PACE)
            self._announce_wanted.clear()
            listener = self._listener.listener
            if listener is None or not listener.alive:
                continue  # other replicas fall back to polling
            try:
                await listener.announce()
            except Exception:  # noqa: BLE001 - polling covers a lost wake-up
                log.warning("NOTIFY failed; other replicas will poll", exc_info=True)

    def close_streams(self) -> None:
        """Ask every open stream to end (UNAVAILABLE) so shutdown can drain."""
        self._closing.set()
        self._wake_watchers()

    async def stop(self) -> None:
        self.close_streams()
        for task in (self._task, self._announcer, self._keeper, self._replay_watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._announcer = self._keeper = self._replay_watcher = None
        await self._listener.close()

    def wake(self) -> None:
        """Get every waiting stream to look at its state (and its guard)."""
        self._wake_watchers()

    def _wake_watchers(self) -> None:
        self._generation += 1
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            _release(waiter)

    async def _wait_for_news(self, generation: int, seconds: float) -> None:
        """Wait until the watchers are woken after `generation`, at most
        `seconds`. One future and one timer per wait: every stream waits
        after every event it sends, and asyncio.timeout around Event.wait
        cost several times as much (its get_running_loop calls each make a
        getpid system call on Python 3.11). A cancellation propagates: it
        cancels this stream's own future only."""
        if self._generation != generation:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.add(waiter)
        timer = loop.call_later(seconds, _release, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiters.discard(waiter)

    async def _tail(self) -> None:
        # After a wake-up whose events are not stable yet (an older
        # transaction is still open), look again soon, backing off.
        retry = 0.0
        loop = asyncio.get_running_loop()
        last_start = -PACE
        while True:
            timeout = retry or self.poll_interval
            await wait_up_to(self._poke, timeout)
            delay = pace_delay(loop.time(), last_start)
            if delay > 0:
                await asyncio.sleep(delay)  # a burst: its commits share one read
            last_start = loop.time()
            self._poke.clear()
            try:
                if self.active_streams == 0:
                    # Nobody is watching: skip the reads, and start the ring
                    # afresh (from the newest stable event) when someone does.
                    self._idle = True
                    continue
                if self._idle:
                    await self._restart_ring()
                pending = await self._catch_up()
            except (DatabaseUnavailable, DatabaseTimeout) as exc:
                # An outage, reported by health: one line, not one per poll.
                self._read_outage.report("reading appointment events: %s", exc)
                retry = self.poll_interval
                continue
            except CursorNotInHistory:
                # A failover discarded the event the tail had reached (the
                # promoted standby never got it): start the ring afresh from
                # the new primary's newest event. Watchers below the new
                # floor read the table, and get OUT_OF_RANGE if their own
                # cursor was lost too.
                log.warning("the event tail's position is not in the database's history")
                self._head = Position.start()
                self._idle = True
                retry = 0.0
                continue
            except CursorCompacted:
                # The tail read nothing for longer than the event retention
                # and its position was pruned: start the ring afresh. Watchers
                # below the new floor read the table, and get OUT_OF_RANGE
                # themselves if their cursor was pruned.
                log.warning("the event tail fell behind the pruned history; restarting it")
                self._idle = True
                retry = 0.0
                continue
            except Exception:  # noqa: BLE001 - keep tailing; the table is the truth
                log.exception("reading appointment events failed")
                retry = self.poll_interval
                continue
            self._read_outage.over()
            retry = min(max(retry * 2, 0.002), self.poll_interval) if pending else 0.0

    async def _restart_ring(self) -> None:
        # Watchers compare their cursor with the floor on every turn, so one
        # that is now below it simply reads the table until it catches up.
        head = await store.stable_head(self.db, gate=self.gate)
        self._events.clear()
        self._head = self._floor = max(head, self._head)
        self._idle = False
        self._wake_watchers()  # those waiting below the new floor read the table now

    async def _catch_up(self) -> bool:
        while True:
            batch, reached, pending = await store.read_after(
                self.db, self._head, EventFilter(), self.batch_size, gate=self.gate
            )
            self._head = reached
            if batch:
                self._events.extend(batch)
                self._trim()
                self._wake_watchers()
            if len(batch) < self.batch_size:
                return pending

    def _trim(self) -> None:
        if len(self._events) > 2 * self.ring_size:
            cut = len(self._events) - self.ring_size
            self._floor = self._events[cut - 1].position
            del self._events[:cut]

    async def stable_head(self) -> Position:
        """Where a stream starting 'now' starts, read where the hub reads."""
        return await store.stable_head(self.db, gate=self.gate)

    async def resume_point(self, after: Position) -> Position:
        """store.resume_point, read where the hub reads."""
        return await store.resume_point(self.db, after, gate=self.gate)

    @contextlib.contextmanager
    def stream_slot(self) -> Iterator[None]:
        if self.active_streams >= self.max_streams:
            raise TooManyStreams(limit=self.max_streams)
        self.active_streams += 1
        self._poke.set()
        try:
            yield
        finally:
            self.active_streams -= 1

    async def watch(
        self,
        after: Position,
        filter_: EventFilter,
        heartbeat_every: float,
        guard: StreamGuard | None = None,
    ) -> AsyncIterator[AppointmentEvent | Heartbeat]:
        """Every event after `after` matching `filter_`, in stream order,
        then live ones; a Heartbeat after `heartbeat_every` idle seconds.
        Before each message, and whenever woken, `guard` is consulted once
        it asks for attention (call `wake` to get a waiting stream to it)."""
        cursor = after
        # An opening heartbeat: the stream is live, and here is where it starts.
        yield Heartbeat(cursor, datetime.now(UTC))
        last_sent = time.monotonic()
        while not self._closing.is_set():
            if guard is not None and guard.attention:
                await guard.check()
            if cursor < self._floor:
                generation, before = self._generation, cursor
                batch, cursor, _ = await store.read_after(
                    self.db, cursor, filter_, self.batch_size, gate=self.gate
                )
                for event in batch:
                    if guard is not None and guard.attention:
                        await guard.check()
                    yield event
                if batch:
                    last_sent = time.monotonic()
                elif cursor == before:
                    # A standby behind this stream's cursor (reads spread
                    # over several standbys): wait for news, do not spin.
                    await self._wait_for_news(generation, self.poll_interval)
                continue
            start = bisect.bisect_right(self._events, cursor, key=lambda e: e.position)
            chunk = self._events[start : start + 256]
            if chunk:
                for event in chunk:
                    if guard is not None and guard.attention:
                        break  # checked at the top, then on from this event
                    cursor = event.position
                    if filter_.matches(event):
                        yield event
                        last_sent = time.monotonic()
                continue
            cursor = max(cursor, self._head)
            idle_for = heartbeat_every - (time.monotonic() - last_sent)
            if idle_for <= 0:
                yield Heartbeat(cursor, datetime.now(UTC))
                last_sent = time.monotonic()
                continue
            generation = self._generation
            if guard is not None and guard.attention:
                continue  # asked for between the top of the loop and now
            await self._wait_for_news(generation, idle_for)
        raise ShuttingDown()
