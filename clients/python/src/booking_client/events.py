"""A resumable consumer of WatchAppointmentEvents.

Delivery is at least once: a checkpoint is saved only after the handler has
returned for an event, so an event whose handling was interrupted comes again
after a restart. Heartbeats are checkpointed too: their cursor covers events
that a filter left out, so a quiet filter does not make a restart replay them.

On UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (too many streams), a
stream that ends or goes silent (no event or heartbeat for ``idle_timeout``
seconds: a half-open connection), it reconnects after the last checkpoint with
exponential backoff and jitter. UNAUTHENTICATED, PERMISSION_DENIED and any
other code stop it: the ``grpc.aio.AioRpcError`` is raised. OUT_OF_RANGE means
the checkpoint is older than the history the server keeps: ``CursorExpired``
is raised, and the consumer must resynchronise (read current state, then watch
from now) rather than silently skip what it missed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc
from booking_client.errors import ErrorDetails, error_details

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str]]
MetadataProvider = Callable[[], Awaitable[Metadata]]
Handler = Callable[[apb.AppointmentEvent], Awaitable[None]]

RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class Checkpoint(Protocol):
    """Where the last processed cursor is kept between runs."""

    def load(self) -> str | None: ...

    def save(self, cursor: str) -> None: ...


class FileCheckpoint:
    """The cursor in a small file, replaced atomically on every save."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def save(self, cursor: str) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(cursor + "\n")
        os.replace(tmp, self.path)


class MemoryCheckpoint:
    def __init__(self, cursor: str | None = None) -> None:
        self.cursor = cursor

    def load(self) -> str | None:
        return self.cursor

    def save(self, cursor: str) -> None:
        self.cursor = cursor


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter between reconnection attempts."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        cap = min(self.maximum, self.initial * self.multiplier**attempt)
        # Half fixed, half random: delays still grow, and a fleet of consumers
        # cut off by the same restart does not come back in lockstep.
        return cap / 2 + random.uniform(0, cap / 2)


class CursorExpired(Exception):
    """The checkpoint is older than the history the server retains."""

    def __init__(self, cursor: str | None, details: ErrorDetails) -> None:
        self.cursor = cursor
        self.details = details
        super().__init__(
            f"cursor {cursor!r} is older than the event history the server keeps "
            f"({details}); events after it are gone: resynchronise from current "
            "state (ListAppointments), then watch from now"
        )


class _Reconnect(Exception):
    pass


class EventConsumer:
    """Follows the event stream, checkpointing and resuming across failures.

    ``metadata`` is the call metadata (``bearer(token)``), or an async function
    that returns it for each (re)connection, so a token can be renewed.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        checkpoint: Checkpoint,
        *,
        metadata: Metadata | MetadataProvider = (),
        event_filter: apb.AppointmentEventFilter | None = None,
        start_position: apb.WatchStartPosition.ValueType = apb.WATCH_START_POSITION_BEGINNING,
        backoff: Backoff = Backoff(),
        idle_timeout: float = 60.0,
    ) -> None:
        self._stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
        self.checkpoint = checkpoint
        self._metadata = metadata
        self._filter = event_filter
        self._start_position = start_position
        self._backoff = backoff
        self._idle_timeout = idle_timeout
        self._stopping = False
        self.connections = 0

    def stop(self) -> None:
        """Make ``run`` return once the current event is handled and saved.

        Meant for the handler; from elsewhere, cancel the task running ``run``.
        """
        self._stopping = True

    def _request(self, cursor: str | None) -> apb.WatchAppointmentEventsRequest:
        request = apb.WatchAppointmentEventsRequest()
        if cursor:
            request.after_cursor = cursor
        else:
            request.start_position = self._start_position
        if self._filter is not None:
            request.filter.CopyFrom(self._filter)
        return request

    async def _call_metadata(self) -> Metadata:
        if callable(self._metadata):
            return await self._metadata()
        return self._metadata

    async def run(self, handle: Handler) -> None:
        """Hand every event to `handle`, in order, until ``stop()`` or a fatal error."""
        self._stopping = False
        attempt = 0
        while True:
            cursor = self.checkpoint.load()
            if cursor:
                log.info("watching after cursor %s", cursor)
            else:
                log.info("watching from %s", apb.WatchStartPosition.Name(self._start_position))
            call: (
                grpc.aio.UnaryStreamCall[
                    apb.WatchAppointmentEventsRequest, apb.WatchAppointmentEventsResponse
                ]
                | None
            ) = None
            try:
                # Inside the try: a metadata provider that logs in can meet the
                # same outage as the stream.
                metadata = await self._call_metadata()
                call = self._stub.WatchAppointmentEvents(self._request(cursor), metadata=metadata)
                self.connections += 1
                responses = aiter(call)
                opened = False
                while True:
                    try:
                        async with asyncio.timeout(self._idle_timeout):
                            response = await anext(responses)
                    except TimeoutError:
                        raise _Reconnect(f"nothing received for {self._idle_timeout:g}s") from None
                    except StopAsyncIteration:
                        raise _Reconnect("the server ended the stream") from None
                    if not opened:
                        # Only a stream that delivers resets the backoff.
                        log.info("stream open")
                        opened, attempt = True, 0
                    if response.HasField("event"):
                        await handle(response.event)
                        self.checkpoint.save(response.event.cursor)
                        if self._stopping:
                            return
                    elif response.HasField("heartbeat"):
                        self.checkpoint.save(response.heartbeat.cursor)
            except _Reconnect as why:
                reason = str(why)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code == grpc.StatusCode.OUT_OF_RANGE:
                    raise CursorExpired(cursor, error_details(err)) from err
                if code not in RECONNECT_CODES:
                    raise
                reason = str(error_details(err))
            finally:
                if call is not None:
                    call.cancel()
            delay = self._backoff.delay(attempt)
            attempt += 1
            log.warning(
                "stream lost (%s); reconnecting in %.1fs (attempt %d)", reason, delay, attempt
            )
            await asyncio.sleep(delay)
