"""The event listener wakes this process for other processes' commits
only: its own NOTIFYs announce commits it already knows about."""

from __future__ import annotations

import asyncio

import asyncpg

from storage.events import CHANNEL
from storage.listener import Listener


async def test_the_listener_ignores_its_own_announcements(database_url: str) -> None:
    heard: list[str] = []
    listener = await Listener.open(database_url, heard.append, CHANNEL)
    other = await asyncpg.connect(database_url)
    try:
        await listener.announce()
        # PostgreSQL delivers pending notifications before it answers.
        await listener.ping(5)
        await asyncio.sleep(0.05)
        assert heard == []

        await other.execute(f"NOTIFY {CHANNEL}, 'elsewhere'")
        for _ in range(100):
            await listener.ping(5)
            if heard:
                break
            await asyncio.sleep(0.01)
        assert heard == ["elsewhere"]
    finally:
        await other.close()
        await listener.close()
