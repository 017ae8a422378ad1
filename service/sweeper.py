"""Releases lapsed holds and forgets expired request ids in the background.
Safe to run in every replica: the SQL skips rows another replica has
locked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from storage import appointments as store
from storage.database import Database
from storage.errors import DatabaseTimeout, DatabaseUnavailable

log = logging.getLogger(__name__)


async def sweep_forever(
    db: Database,
    *,
    interval: float,
    batch_size: int,
    on_release: Callable[[], None],
    request_id_retention: timedelta,
) -> None:
    while True:
        try:
            released = await store.expire_holds(db, batch_size)
        except asyncio.CancelledError:
            raise
        except (DatabaseUnavailable, DatabaseTimeout) as exc:
            # An outage, reported by health: one line, no traceback.
            log.warning("expiring holds skipped: %s", exc)
            released = 0
        except Exception:  # noqa: BLE001 - try again next round
            log.exception("expiring holds failed")
            released = 0
        if released:
            log.info("released %d expired holds", released)
            on_release()
        try:
            forgotten = await store.forget_request_ids(db, request_id_retention, batch_size)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - try again next round
            log.exception("forgetting expired request ids failed")
            forgotten = 0
        # A full batch means more may be waiting: go again at once.
        if released < batch_size and forgotten < batch_size:
            await asyncio.sleep(interval)
