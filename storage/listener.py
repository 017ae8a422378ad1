"""The LISTEN connection: one class for every channel the service follows
(new events, storage/events.py CHANNEL; token invalidations,
storage/auth.py AUTH_CHANNEL)."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from storage.database import tls_options


class Listener:
    """A dedicated connection that LISTENs on one channel, and announces on it.

    NOTIFY is delivered only at commit and never replayed, so it is just a
    wake-up; readers always go back to the table. Events are announced by
    the service after a transition commits, not by a trigger inside the
    transaction: PostgreSQL serialises the commits of notifying transactions
    (a global lock held through the commit's WAL flush), which cut hold
    throughput by more than half in our measurements (docs/events.md).
    """

    def __init__(self, conn: asyncpg.Connection, channel: str) -> None:
        self._conn = conn
        self._channel = channel

    @classmethod
    async def open(
        cls,
        dsn: str,
        on_notify: Callable[[str], None],
        channel: str,
        *,
        application_name: str = "booking-listener",
        connect_within: float = 60.0,
    ) -> Listener:
        """Listen on `channel`; `on_notify` gets each notification's payload."""
        conn = await asyncpg.connect(
            dsn,
            server_settings={"application_name": application_name},
            timeout=connect_within,
            **tls_options(dsn),
        )
        own = conn.get_server_pid()

        def deliver(_c: object, pid: int, _ch: str, payload: str) -> None:
            # Our own NOTIFYs come back to us too, but they announce commits
            # this process already knows about (EventHub.committed wakes its
            # tail directly): each would cost a redundant read of the log.
            if pid != own:
                on_notify(payload)

        await conn.add_listener(channel, deliver)
        return cls(conn, channel)

    @property
    def alive(self) -> bool:
        return not self._conn.is_closed()

    async def ping(self, within: float) -> None:
        """One round trip, or an exception within `within` seconds.

        A half-open connection (its backend stopped, or the network gone
        quiet) still looks alive and silently delivers nothing; only a round
        trip shows it. PostgreSQL sends pending notifications before it
        answers, so after a ping every notification committed before it
        began has been delivered.
        """
        await self._conn.fetchval("SELECT 1", timeout=within)

    def terminate(self) -> None:
        """Drop the connection at once, without waiting for the server."""
        self._conn.terminate()

    async def announce(self) -> None:
        """Wake every listener of the channel (other replicas included)."""
        await self._conn.execute(f"NOTIFY {self._channel}")

    async def close(self) -> None:
        if not self._conn.is_closed():
            await self._conn.close(timeout=2)
