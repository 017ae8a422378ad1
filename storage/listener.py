"""The LISTEN connection: one class for every channel the service follows
(new events, storage/events.py CHANNEL; token invalidations,
storage/auth.py AUTH_CHANNEL)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg

from storage import hosts

log = logging.getLogger(__name__)


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
        # The primary of a multi-host URL (storage/hosts.py): LISTEN is
        # refused on a standby, and NOTIFY is sent only on the primary.
        conn = await hosts.connect(
            dsn,
            server_settings={"application_name": application_name},
            timeout=connect_within,
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


class KeptListener:
    """One LISTEN connection kept open: the one keep-alive and reconnect path
    for every channel the service follows.

    :meth:`run` (a task of its owner) opens the connection, proves it with a
    round trip every `ping_every` seconds (a half-open connection looks alive
    and silently delivers nothing; only a round trip shows it) and, when it
    fails or closes, drops it and opens another, retrying after `retry_after`
    seconds, doubling up to `max_backoff`.

    Callbacks: `on_lost` when the connection is dropped, and again once a new
    one listens (notifications sent meanwhile are gone, so whatever they keep
    fresh must be distrusted); `on_up` when a connection listens;
    `on_unreachable` when one cannot be opened; `on_confirmed(started)` after
    each good round trip, which proves every notification committed before
    the monotonic instant `started` has been delivered (:attr:`confirmed`).
    """

    def __init__(
        self,
        dsn: str,
        channel: str,
        on_notify: Callable[[str], None],
        *,
        application_name: str,
        ping_every: float,
        ping_timeout: float,
        connect_within: float,
        retry_after: float,
        max_backoff: float,
        on_lost: Callable[[], None] = lambda: None,
        on_up: Callable[[], None] = lambda: None,
        on_unreachable: Callable[[BaseException], None] = lambda exc: None,
        on_confirmed: Callable[[float], None] = lambda started: None,
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_notify = on_notify
        self.application_name = application_name
        self.ping_every = ping_every
        self.ping_timeout = ping_timeout
        self.connect_within = connect_within
        self.retry_after = retry_after
        self.max_backoff = max_backoff
        self.on_lost = on_lost
        self.on_up = on_up
        self.on_unreachable = on_unreachable
        self.on_confirmed = on_confirmed
        self.listener: Listener | None = None
        # Monotonic start of the last round trip that succeeded.
        self.confirmed = -float("inf")

    @property
    def alive(self) -> bool:
        return self.listener is not None and self.listener.alive

    async def run(self) -> None:
        backoff = self.retry_after
        while True:
            if await self._listening():
                backoff = self.retry_after
                await asyncio.sleep(self.ping_every)
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    async def _listening(self) -> bool:
        """(Re)connect if need be, then one round trip: whether it worked."""
        if self.listener is None or not self.listener.alive:
            self.drop()
            try:
                self.listener = await Listener.open(
                    self.dsn,
                    self.on_notify,
                    self.channel,
                    application_name=self.application_name,
                    connect_within=self.connect_within,
                )
            except Exception as exc:  # noqa: BLE001 - the owner decides what it means
                self.on_unreachable(exc)
                return False
            self.on_up()
            # Whatever happened while nobody listened is unknown.
            self.on_lost()
        started = time.monotonic()
        try:
            await self.listener.ping(self.ping_timeout)
        except Exception:  # noqa: BLE001 - any failure means "not listening"
            log.warning("the %s listener stopped answering; reconnecting", self.channel)
            self.drop()
            return False
        self.confirmed = started
        self.on_confirmed(started)
        return True

    def drop(self) -> None:
        """Forget the connection (terminated, not closed: a half-open one
        would make us wait for it)."""
        self.confirmed = -float("inf")
        if self.listener is not None:
            self.listener.terminate()
            self.listener = None
        self.on_lost()

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
