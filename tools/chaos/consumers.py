"""Event consumers: WatchAppointmentEvents from the beginning, resuming
from the last cursor received (event or heartbeat) after any error, the
way a real consumer checkpoints."""

from __future__ import annotations

import asyncio
import random

import grpc

from booking.v1 import appointment_pb2 as apb
from chaos.history import FORBIDDEN, ConsumerLog
from chaos.workload import Replicas, Seat

# With heartbeats every half second, this long without any message means the
# stream is stuck (say, a half-open connection): drop it and resume.
IDLE_SECONDS = 15.0


class Consumer:
    def __init__(
        self, name: str, home: int, replicas: Replicas, seat: Seat, specialist_id: str = ""
    ) -> None:
        self.log = ConsumerLog(name, specialist_id)
        self.filter = apb.AppointmentEventFilter(specialist_id=specialist_id)
        self.home = home
        self.replicas = replicas
        self.seat = seat
        self.cursor = ""
        self.last_message = 0.0
        self._dropped = False

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            # Home replica first; after a failure, whichever replica is next.
            replica = (self.home + failures) % len(self.replicas)
            if self.cursor:
                request = apb.WatchAppointmentEventsRequest(
                    after_cursor=self.cursor, filter=self.filter
                )
            else:
                request = apb.WatchAppointmentEventsRequest(
                    start_position=apb.WATCH_START_POSITION_BEGINNING, filter=self.filter
                )
            call = self.replicas.stubs[replica].appointments.WatchAppointmentEvents(
                request, metadata=self.seat.metadata
            )
            self.log.connects += 1
            self.last_message = loop.time()
            watchdog = asyncio.create_task(self._watchdog(call, stop))
            try:
                async for message in call:
                    self.last_message = loop.time()
                    if message.HasField("event"):
                        self.log.event_ids.append(message.event.id)
                        self.log.event_types.append(
                            apb.AppointmentEventType.Name(message.event.type).removeprefix(
                                "APPOINTMENT_EVENT_TYPE_"
                            )
                        )
                        self.cursor = message.event.cursor
                    elif message.HasField("heartbeat"):
                        self.cursor = message.heartbeat.cursor
                    failures = 0
                self.log.errors["ended"] += 1
            except grpc.aio.AioRpcError as err:
                code = err.code().name
                self.log.errors[code] += 1
                if code in FORBIDDEN:
                    self.log.bad_messages.append(f"{code}: {err.details()}")
                failures += 1
            except asyncio.CancelledError:
                # Our own watchdog cancelled the call: resume. Anything else
                # is the task being cancelled.
                if stop.is_set():
                    break
                if not self._dropped:
                    raise
                self._dropped = False
                failures += 1
            finally:
                watchdog.cancel()
            if not stop.is_set():
                await asyncio.sleep(0.05 + random.random() * 0.2)

    async def _watchdog(self, call: grpc.aio.UnaryStreamCall, stop: asyncio.Event) -> None:  # type: ignore[type-arg]
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            if stop.is_set():
                self._dropped = True
                call.cancel()
                return
            if loop.time() - self.last_message > IDLE_SECONDS:
                self.log.stalls += 1
                self._dropped = True
                call.cancel()
                return


class Pager:
    """A consumer that pages ListAppointmentEvents from its last event's
    cursor (no stream: a poller, the way a batch job reads the log), on its
    own replica first and on the next one after a failure. Its log is
    checked like a watcher's (consumer_sequence)."""

    PAGE_SIZE = 200
    IDLE_PAUSE = 0.2

    def __init__(self, name: str, home: int, replicas: Replicas, seat: Seat) -> None:
        self.log = ConsumerLog(name)
        self.home = home
        self.replicas = replicas
        self.seat = seat
        self.cursor = ""

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        connected = -1
        while not stop.is_set():
            replica = (self.home + failures) % len(self.replicas)
            if replica != connected:
                self.log.connects += 1
                connected = replica
            try:
                page = await self.replicas.stubs[replica].appointments.ListAppointmentEvents(
                    apb.ListAppointmentEventsRequest(
                        after_cursor=self.cursor, page_size=self.PAGE_SIZE
                    ),
                    metadata=self.seat.metadata,
                    timeout=5,
                )
            except grpc.aio.AioRpcError as err:
                code = err.code().name
                self.log.errors[code] += 1
                if code in FORBIDDEN:
                    self.log.bad_messages.append(f"{code}: {err.details()}")
                failures += 1
                await asyncio.sleep(0.05 + random.random() * 0.2)
                continue
            failures = 0
            for event in page.events:
                self.log.event_ids.append(event.id)
                self.log.event_types.append(
                    apb.AppointmentEventType.Name(event.type).removeprefix(
                        "APPOINTMENT_EVENT_TYPE_"
                    )
                )
                self.cursor = event.cursor
            if len(page.events) < self.PAGE_SIZE:
                try:
                    await asyncio.wait_for(stop.wait(), self.IDLE_PAUSE)
                except TimeoutError:
                    pass
