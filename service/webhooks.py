"""The webhook dispatcher: every event of the log, in order, to every
enabled endpoint that asked for its type (docs/operations.md, "Webhooks").

Each replica runs one. Every poll it takes the lease of the endpoints that
are due and free (storage/webhooks.py, at most `concurrency` at a time) and
runs one task per endpoint: read the events after the endpoint's cursor
(storage/events.py, the same stable (xid, seq) reader the streams use),
POST them one at a time, and after each 2xx move the cursor in a
transaction of its own, never held across the request. So delivery to one
endpoint is in event order, one request at a time; a failure records the
attempt with a backoff and gives up the lease; a replica that dies loses
nothing (its lease expires and another replica sends the same event again).

The lease is at least twice the delivery timeout, and renewed before each
request unless it has more than a timeout plus a margin left, so a
request always ends (or is abandoned) before another replica may take
over: two replicas never send to one endpoint at the same time.

Requests follow the Standard Webhooks specification: headers webhook-id
(the event id, for deduplication), webhook-timestamp (seconds) and
webhook-signature (``v1,<base64 HMAC-SHA256 of id.timestamp.body>`` for
each of the endpoint's secrets, space separated); the body is a CloudEvents
1.0 structured JSON event whose data is the AppointmentEvent message in its
proto3 JSON form.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
from google.protobuf import json_format

from service import convert, telemetry
from storage import events as event_log
from storage import webhooks as store
from storage.database import Database
from storage.errors import BookingError, CursorCompacted
from storage.models import AppointmentEvent, EventFilter, Position

log = logging.getLogger(__name__)

SOURCE = "/booking-service"
CONTENT_TYPE = "application/cloudevents+json"
BATCH = 100
# Kept in hand beyond one delivery's timeout before a request may start.
LEASE_MARGIN_SECONDS = 2.0


@dataclass(frozen=True)
class Settings:
    poll_seconds: float = 1.0
    concurrency: int = 8
    timeout_seconds: float = 10.0
    lease_seconds: float = 30.0
    max_failures: int = 10
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 300.0


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def cloud_event(event: AppointmentEvent) -> bytes:
    data = json_format.MessageToDict(convert.event(event), preserving_proto_field_name=True)
    body: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(event.id),
        "source": SOURCE,
        "type": f"booking.appointment.{event.type.value.lower()}",
        "subject": str(event.appointment.id),
        "time": event.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


async def _refuse_pruned_start(db: Database) -> None:
    pruned = await event_log.resume_point(db, Position.start())
    if pruned != Position.start():
        raise CursorCompacted(cursor="0-0", oldest_cursor=f"{pruned.xid}-{pruned.seq}")


def _failure_reason(status: int) -> str:
    return "http_410" if status == 410 else f"http_{status // 100}xx"


class Dispatcher:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        client: httpx.AsyncClient | None = None,
        owner: str | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout_seconds),
            limits=httpx.Limits(max_connections=settings.concurrency),
            follow_redirects=False,
            headers={"user-agent": "booking-service-webhooks"},
        )
        self._running: dict[UUID, asyncio.Task[None]] = {}
        # Per endpoint: the commit time of the event this replica is trying
        # to deliver (also while it waits out a backoff), and when it last
        # tried (the backlog-age gauge).
        self._oldest_pending: dict[UUID, tuple[datetime, float]] = {}
        # An entry not tried again within this long belongs to another
        # replica now (or to an endpoint disabled or deleted): ignored.
        self._pending_for = (
            settings.backoff_max_seconds + settings.lease_seconds + (2 * settings.poll_seconds)
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.now: Callable[[], float] = time.time

    def backlog_age(self) -> float:
        """Seconds since the commit of the oldest event this replica is
        trying to deliver to an endpoint (retries included); 0 when none."""
        # Read at a scrape, from the metrics thread: a snapshot, no mutation.
        recent = time.monotonic() - self._pending_for
        pending = [c for c, tried in list(self._oldest_pending.values()) if tried >= recent]
        if not pending:
            return 0.0
        return max(0.0, (datetime.now(UTC) - min(pending)).total_seconds())

    def wake(self) -> None:
        """New events committed: look for due endpoints before the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self._claim()
            except BookingError as exc:  # the database is away: try again next poll
                log.debug("webhook claim failed: %s", exc)
            except Exception:  # noqa: BLE001 - the loop must survive
                log.exception("webhook dispatcher poll failed")
            self._wake.clear()
            # asyncio.timeout, not wait_for: wait_for runs the wait as a task
            # of its own, which the loop can find still pending at shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_seconds):
                    await self._wake.wait()

    async def _claim(self) -> None:
        free = self.settings.concurrency - len(self._running)
        endpoints = await store.claim(
            self.db, self.owner, lease=self._lease, limit=free, busy=list(self._running)
        )
        for endpoint in endpoints:
            task = asyncio.create_task(self._serve(endpoint), name=f"webhook-{endpoint.id}")
            self._running[endpoint.id] = task
            task.add_done_callback(self._finished(endpoint.id))

    def _finished(self, key: UUID) -> Callable[[asyncio.Task[None]], None]:
        def done(_: asyncio.Task[None]) -> None:
            self._running.pop(key, None)

        return done

    async def _serve(self, endpoint: store.Endpoint) -> None:
        """Deliver to one endpoint until it is caught up, fails, or the lease
        is lost; or, when every slot is busy, for one batch, so that a busy
        endpoint does not keep the others waiting."""
        lease_until = time.monotonic() + self.settings.lease_seconds
        release = True
        yielded = False
        try:
            while True:
                types = frozenset(endpoint.event_types)
                try:
                    if endpoint.cursor == Position.start():
                        # The start of the log means "from the first event":
                        # the reader would quietly skip pruned history.
                        await _refuse_pruned_start(self.db)
                    events, head, _ = await event_log.read_after(
                        self.db, endpoint.cursor, EventFilter(types=types), BATCH
                    )
                except CursorCompacted:
                    log.warning("webhook endpoint %s fell behind event retention", endpoint.id)
                    telemetry.metrics().webhook_disabled.add(1, {"reason": "COMPACTED"})
                    await store.disable(self.db, endpoint.id, self.owner, "COMPACTED")
                    release = False
                    return
                if not events:
                    self._oldest_pending.pop(endpoint.id, None)
                    if head > endpoint.cursor:
                        await store.advance(
                            self.db, endpoint.id, self.owner, head, delivered=0, lease=self._lease
                        )
                    return
                for event in events:
                    self._oldest_pending[endpoint.id] = (event.created_at, time.monotonic())
                    if time.monotonic() + self.settings.timeout_seconds + LEASE_MARGIN_SECONDS > (
                        lease_until
                    ):
                        renewed = await store.renew(self.db, endpoint.id, self.owner, self._lease)
                        if renewed is None:
                            release = False
                            return
                        endpoint = renewed
                        lease_until = time.monotonic() + self.settings.lease_seconds
                    started = time.monotonic()
                    outcome = await self._post(endpoint, event)
                    if outcome is not None:
                        await self._failed(endpoint, outcome)
                        release = False  # fail() gave the lease up
                        return
                    telemetry.metrics().webhook_deliveries.add(1)
                    telemetry.metrics().webhook_lag.record(
                        max(0.0, (datetime.now(UTC) - event.created_at).total_seconds())
                    )
                    if not await store.advance(
                        self.db,
                        endpoint.id,
                        self.owner,
                        event.position,
                        delivered=1,
                        lease=self._lease,
                    ):
                        release = False  # another replica holds it now
                        return
                    lease_until = started + self.settings.lease_seconds
                    self._oldest_pending.pop(endpoint.id, None)
                if len(self._running) >= self.settings.concurrency:
                    # Every slot is busy: give the others waiting a turn. The
                    # release puts this endpoint at the back of the queue.
                    yielded = True
                    return
                current = await store.renew(self.db, endpoint.id, self.owner, self._lease)
                if current is None:
                    release = False
                    return
                endpoint = current
                lease_until = time.monotonic() + self.settings.lease_seconds
        except BookingError as exc:
            log.warning("webhook endpoint %s: database error: %s", endpoint.id, exc)
        except Exception:  # noqa: BLE001 - a bug: logged, and the next poll tries again
            log.exception("webhook delivery to endpoint %s failed", endpoint.id)
        finally:
            if release:
                with contextlib.suppress(Exception):
                    await asyncio.shield(store.release(self.db, endpoint.id, self.owner))
            if yielded:
                self.wake()

    async def _post(
        self, endpoint: store.Endpoint, event: AppointmentEvent
    ) -> tuple[str, int] | None:
        """None after a 2xx; else (reason label, HTTP status or 0)."""
        body = cloud_event(event)
        msg_id = str(event.id)
        timestamp = int(self.now())
        headers = {
            "content-type": CONTENT_TYPE,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(
                signature(s, msg_id, timestamp, body) for s in endpoint.secrets
            ),
        }
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                async with self._client.stream(
                    "POST", endpoint.url, content=body, headers=headers
                ) as response:
                    status = response.status_code
        except (TimeoutError, httpx.TimeoutException):
            return "timeout", 0
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError):
            return "connection", 0
        if 200 <= status < 300:
            return None
        return _failure_reason(status), status

    async def _failed(self, endpoint: store.Endpoint, outcome: tuple[str, int]) -> None:
        reason, status = outcome
        telemetry.metrics().webhook_failures.add(1, {"reason": reason})
        error = f"HTTP {status}" if status else reason
        enabled, failures = await store.fail(
            self.db,
            endpoint.id,
            self.owner,
            error=error,
            gone=status == 410,
            max_failures=self.settings.max_failures,
            backoff_base=self.settings.backoff_base_seconds,
            backoff_max=self.settings.backoff_max_seconds,
        )
        if not enabled and failures:
            why = "GONE" if status == 410 else "FAILURES"
            telemetry.metrics().webhook_disabled.add(1, {"reason": why})
            log.warning(
                "webhook endpoint %s disabled (%s) after %d failures", endpoint.id, why, failures
            )
