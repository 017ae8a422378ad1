"""Releases lapsed holds in the background. Safe to run in every replica:
the SQL skips holds another replica has locked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from storage import appointments as store
from storage.database import Database
from storage.errors import DatabaseTimeout, DatabaseUnavailable

log = logging.getLogger(__name__)


async def sweep_forever(
    db: Database, *, interval: float, batch_size: int, on_release: Callable[[], None]
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
        # A full batch means more may be waiting: go again at once.
        if released < batch_size:
            await asyncio.sleep(interval)
