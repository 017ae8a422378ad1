"""Standbys that serve reads (Intent.READ), each checked before every read.

The read URL names one or more hot standbys (or one HAProxy port in front
of Patroni's replica check). Each host gets a small pool of its own. Before
a read is run on one of its sessions, one statement, outside any
transaction, asks that standby for its state:

- ``pg_is_in_recovery()``: a node out of recovery (a promoted standby) is
  not a read node; it is skipped until it is a standby again;
- its replay position and timeline, compared with the caller's token: the
  read runs there only if *that* standby has replayed past the token on the
  token's timeline of the token's cluster (the snapshot of the read is
  taken after the check, so it holds everything replayed by then);
- its replay delay: unknown (infinite) while it is not streaming from a
  primary (cut off, it could be stale without bound); 0 while everything
  received has been replayed (an idle primary sends nothing); else the age
  of the last replayed commit. Beyond the maximum lag a tokenless read
  skips it.

A host that refuses, times out (a paused server) or breaks is skipped for
DOWN_SECONDS. When no standby qualifies (a token none has reached within
the token wait, a token of another timeline or cluster, every standby
lagging or down), the read goes to the primary: a read is never refused or
served stale because of a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from storage import consistency, hosts

log = logging.getLogger(__name__)

# How long a standby that failed (refused, timed out, broke a session, was
# promoted) is left out before it is tried again.
DOWN_SECONDS = 1.0
# The least time a standby's check gets, however close the call's deadline.
MIN_CHECK_SECONDS = 0.02
# Polling a standby's replay position while a token waits for it.
POLL_SECONDS = (0.002, 0.005, 0.01, 0.02)

# One round trip, outside a transaction: role, replay position, replay
# delay, timeline being received, cluster identity.
CHECK_SQL = (
    "SELECT pg_is_in_recovery(),"
    " (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8,"
    " CASE WHEN NOT EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming')"
    " THEN 'Infinity'::float8"
    " WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn()"
    " THEN 0::float8"
    " ELSE coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())"
    "::float8, 'Infinity') END,"
    " (SELECT received_tli FROM pg_stat_wal_receiver)"
)
SYSTEM_SQL = "SELECT system_identifier FROM pg_control_system()"


@dataclass(frozen=True)
class Settings:
    """Where reads may go and how stale they may be."""

    url: str
    max_lag_seconds: float = 5.0
    token_wait_seconds: float = 0.5
    # Per standby: connecting and answering the check.
    check_seconds: float = 0.5
    pool_max_size: int = 10


PoolFactory = Callable[[str, int, float], Awaitable[asyncpg.Pool]]


@dataclass
class Node:
    host: hosts.Host
    url: str
    pool: asyncpg.Pool | None = None
    down_until: float = 0.0
    system: int | None = None
    # The timeline it last reported receiving (None while its walreceiver
    # is not running); kept across a reconnect of the walreceiver.
    timeline: int | None = None
    problem: str = ""
    # Whether its last check passed (a change is logged once, not per check).
    up: bool = True


@dataclass
class Lease:
    """A checked session on a standby, for one read."""

    node: Node
    conn: Any
    replayed: int


@dataclass
class Counters:
    standby: int = 0
    primary: int = 0
    token_waits: list[float] = field(default_factory=list)


class Standbys:
    """The read nodes of one read URL."""

    def __init__(self, settings: Settings, pool_factory: PoolFactory) -> None:
        self.settings = settings
        target = hosts.parse(settings.url)
        self.nodes = [Node(h, target.url_for(h)) for h in target.hosts]
        self._factory = pool_factory
        self._next = itertools.count()
        self._pool_lock = asyncio.Lock()
        self.counters = Counters()
        # Fallbacks to the primary, by reason (tests and the bench read it).
        self.fallbacks: dict[str, int] = {}

    async def close(self) -> None:
        for node in self.nodes:
            if node.pool is not None:
                pool, node.pool = node.pool, None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.close(), 2.0)
                pool.terminate()

    def _rotation(self) -> list[Node]:
        start = next(self._next) % len(self.nodes)
        return self.nodes[start:] + self.nodes[:start]

    def mark_down(self, node: Node, problem: str) -> None:
        if node.up:
            log.info("read node %s left out: %s", node.host, problem)
        node.up = False
        node.down_until = time.monotonic() + DOWN_SECONDS
        node.problem = problem

    async def _pool(self, node: Node) -> asyncpg.Pool:
        if node.pool is None:
            async with self._pool_lock:
                if node.pool is None:
                    node.pool = await self._factory(
                        node.url, self.settings.pool_max_size, self.settings.check_seconds
                    )
        return node.pool

    async def _check(
        self, node: Node, bound: float
    ) -> tuple[Any, tuple[bool, int, float, int | None]] | None:
        """A session on `node` and its state within `bound` seconds, or
        None (node left out)."""
        conn = None
        done = False
        try:
            pool = await self._pool(node)
            async with asyncio.timeout(bound):
                conn = await pool.acquire()
                if node.system is None:
                    node.system = int(await conn.fetchval(SYSTEM_SQL))
                row = await conn.fetchrow(CHECK_SQL)
            done = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: leave the node out
            self.mark_down(node, f"{type(exc).__name__}: {exc}".strip())
            return None
        finally:
            if conn is not None and not done:
                # Interrupted mid-statement (timeout, cancellation): the
                # session's state is unknown; it leaves the pool.
                with contextlib.suppress(Exception):
                    conn.terminate()
                await self.release(node, conn)
        in_recovery, replayed, lag, timeline = bool(row[0]), row[1], float(row[2]), row[3]
        if timeline is not None:
            node.timeline = int(timeline)
        return conn, (in_recovery, int(replayed or 0), lag, node.timeline)

    async def release(self, node: Node, conn: Any) -> None:
        pool = node.pool
        if pool is None:
            with contextlib.suppress(Exception):
                conn.terminate()
            return
        task = asyncio.ensure_future(pool.release(conn, timeout=2.0))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        with contextlib.suppress(Exception):
            await asyncio.shield(task)

    def _bound(self, limit: float | None, started: float) -> float:
        """One check's time: read_check_seconds, but at most a third of the
        call's time left, so a paused standby cannot use up the deadline
        before the primary is asked (never below MIN_CHECK_SECONDS)."""
        if limit is None:
            return self.settings.check_seconds
        left = limit - (time.monotonic() - started)
        return max(MIN_CHECK_SECONDS, min(self.settings.check_seconds, left / 3))

    async def acquire(self, token: consistency.Token | None, limit: float | None) -> Lease | None:
        """A checked standby session for a read needing `token` (None: any
        standby within the maximum lag), or None: serve it from the primary.
        `limit` is the call's time left; a token waits at most
        min(token_wait_seconds, half of it)."""
        wait = self.settings.token_wait_seconds if token is not None else 0.0
        if limit is not None:
            wait = min(wait, max(0.0, limit / 2))
        started = time.monotonic()
        give_up = started + wait
        polls = 0
        while True:
            behind = False
            for node in self._rotation():
                if time.monotonic() < node.down_until:
                    continue
                checked = await self._check(node, self._bound(limit, started))
                if checked is None:
                    continue
                conn, (in_recovery, replayed, lag, timeline) = checked
                if in_recovery and not node.up:
                    node.up = True
                    log.info("read node %s is a standby again", node.host)
                usable = False
                if not in_recovery:
                    # Promoted: a primary now, no replay position to compare.
                    self.mark_down(node, "not in recovery (promoted)")
                elif token is None:
                    usable = lag <= self.settings.max_lag_seconds
                elif token.system != node.system:
                    pass  # another cluster's token: only the primary
                elif timeline is not None and token.timeline == timeline:
                    usable = replayed >= token.lsn
                    behind = not usable
                elif timeline is None or token.timeline > timeline:
                    behind = True  # it may yet switch to the token's timeline
                if usable:
                    if token is not None:
                        self.counters.token_waits.append(time.monotonic() - started)
                    self.counters.standby += 1
                    return Lease(node, conn, replayed)
                await self.release(node, conn)
            if not behind or time.monotonic() >= give_up:
                self.counters.primary += 1
                reason = "token" if token is not None else "lag_or_down"
                self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
                return None
            await asyncio.sleep(
                min(POLL_SECONDS[min(polls, len(POLL_SECONDS) - 1)], give_up - time.monotonic())
            )
            polls += 1
