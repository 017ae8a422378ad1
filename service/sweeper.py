"""Releases lapsed holds (offering their slots to the waitlist), expires
waitlist entries whose window ended, forgets expired request ids and prunes
old events in the background.
Safe to run in every replica: the SQL skips rows another replica has
locked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from service import telemetry
from storage import appointments as store
from storage import waitlist
from storage.database import Database
from storage.errors import DatabaseTimeout, DatabaseUnavailable

log = logging.getLogger(__name__)


async def _count(what: str, work: Awaitable[int]) -> int:
    """Run one batch; a failure is logged and counts as nothing done, so the
    next round tries again."""
    try:
        return await work
    except (DatabaseUnavailable, DatabaseTimeout) as exc:
        # An outage, reported by health: one line, no traceback.
        log.warning("%s skipped: %s", what, exc)
    except Exception:  # noqa: BLE001 - try again next round
        log.exception("%s failed", what)
    return 0


async def sweep_forever(
    db: Database,
    *,
    interval: float,
    batch_size: int,
    on_release: Callable[[], None],
    request_id_retention: timedelta,
    event_retention: timedelta | None = None,
) -> None:
    """`event_retention` None keeps every event."""
    while True:
        released = await _count("expiring holds", store.expire_holds(db, batch_size))
        if released:
            log.info("released %d expired holds", released)
            telemetry.metrics().sweeper_released.add(released)
            on_release()
        expired = await _count("expiring waitlist entries", waitlist.expire(db, batch_size))
        forgotten = await _count(
            "forgetting expired request ids",
            store.forget_request_ids(db, request_id_retention, batch_size),
        )
        pruned = 0
        if event_retention is not None:
            pruned = await _count(
                "pruning old events", store.prune_events(db, event_retention, batch_size)
            )
            if pruned:
                log.info("pruned %d events", pruned)
        # A full batch means more may be waiting: go again at once.
        if max(released, expired, forgotten, pruned) < batch_size:
            await asyncio.sleep(interval)
