"""A primary that resumes after being replaced in its absence takes no write
and answers no replay: the synchronous standby's lease
(storage/sql/durability.sql, storage/sql/lease.sql, docs/cluster.md).

A real primary streams to a real synchronous standby (tests/replication.py).
Our own sessions leave statements in the primary's sockets while it is
frozen with SIGSTOP, as a service's sessions do when the node hangs: a
single-statement write, the COMMIT of a transaction that wrote before the
freeze, and a sync barrier (what a replay runs). The standby is promoted in
the primary's absence, as Patroni does after its TTL, and the old primary
resumes later than the lease: each statement must be refused at its commit
(STANDBY_LEASE_EXPIRED), none may reach the commit record. Without the
lease the write and the COMMIT commit on the old primary and wait for a
standby that is gone, and the barrier's commit waits as well.

A synchronous standby that stops answering makes the primary refuse commits
too (UNAVAILABLE, retried), until it answers again or the HA manager takes
it out of ``synchronous_standby_names``, as Patroni's non-strict mode does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest

from service.errors import code_for
from storage import errors, events
from storage.database import Database
from storage.models import EventFilter, Position
from tests.replication import Node, ReplicatedCluster, replicated_cluster

# booking.standby_lease when unset (storage/sql/durability.sql).
LEASE = 2.0
# Waited past the lease so the freshest reply the frozen node may still
# read from its sockets (sent by the standby until its promotion) is older.
PAST_LEASE = LEASE + 1.5


@pytest.fixture
async def cluster() -> AsyncIterator[ReplicatedCluster]:
    async with replicated_cluster(1) as c:
        yield c


def _key() -> str:
    return f"lease-{uuid.uuid4()}"


_WRITE = "INSERT INTO login_throttle (email_key, failures) VALUES ($1, 1)"


def _is_lease_refusal(exc: BaseException) -> bool:
    if not isinstance(exc, asyncpg.PostgresError):
        return False
    domain = errors.translate(exc)
    return isinstance(domain, errors.StandbyLeaseExpired)


async def _waiting_for_standby(node: Node) -> set[int]:
    rows = await node.fetchval(
        "SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
    )
    return set(rows)  # type: ignore[call-overload]


async def _settled(node: Node, tasks: dict[int, asyncio.Task[Any]]) -> dict[int, str]:
    """Each session's outcome on the resumed node, by backend pid:
    'committed' (its commit record is written: done, or waiting for the
    synchronous standby), the name of the domain error it was refused with
    (StandbyLeaseExpired, CommitDeadlinePassed), or the exception's name."""
    outcome: dict[int, str] = {}
    while len(outcome) < len(tasks):
        waiting = await _waiting_for_standby(node)
        for pid, task in tasks.items():
            if pid in outcome:
                continue
            if task.done():
                exc = task.exception()
                if exc is None:
                    outcome[pid] = "committed"
                elif isinstance(exc, asyncpg.PostgresError) and errors.translate(exc):
                    outcome[pid] = type(errors.translate(exc)).__name__
                else:
                    outcome[pid] = type(exc).__name__
            elif pid in waiting:
                outcome[pid] = "committed"
        await asyncio.sleep(0.05)
    return outcome


async def test_a_resumed_old_primary_refuses_what_waited_in_its_sockets(
    cluster: ReplicatedCluster,
) -> None:
    old, standby = cluster.primary, cluster.standbys[0]
    sessions = [await asyncpg.connect(old.url(), ssl=False) for _ in range(3)]
    single, transaction, barrier = sessions
    try:
        # Healthy: the lease is held, a write commits.
        await single.execute(_WRITE, _key())
        await transaction.execute("BEGIN")
        await transaction.execute(_WRITE, _key())
        pids = [s.get_server_pid() for s in sessions]

        old.pause()
        tasks = {
            pids[0]: asyncio.create_task(single.execute(_WRITE, _key())),
            pids[1]: asyncio.create_task(transaction.execute("COMMIT")),
            pids[2]: asyncio.create_task(barrier.execute("SELECT booking_sync_barrier()")),
        }
        await asyncio.sleep(0.2)  # the statements are in the frozen node's sockets
        standby.promote()
        await asyncio.sleep(PAST_LEASE)
        old.resume()

        outcome = await _settled(old, tasks)
        assert outcome == dict.fromkeys(pids, "StandbyLeaseExpired"), outcome

        # The refusal is a retryable UNAVAILABLE, with its reason.
        exc = tasks[pids[0]].exception()
        assert isinstance(exc, asyncpg.PostgresError)
        domain = errors.translate(exc)
        assert isinstance(domain, errors.StandbyLeaseExpired)
        assert domain.metadata() == {"max_age": "2s"}
        assert code_for(domain) is grpc.StatusCode.UNAVAILABLE
        # Nothing of the refused writes is on the old node.
        assert await old.fetchval("SELECT count(*) FROM login_throttle") == 1
    finally:
        for session in sessions:
            session.terminate()


async def test_a_silent_synchronous_standby_makes_commits_refused_until_it_answers(
    cluster: ReplicatedCluster,
) -> None:
    primary, standby = cluster.primary, cluster.standbys[0]
    # Without the lease a commit would wait for the paused standby: the
    # client's timeout ends the wait, so the check fails, not hangs.
    session = await asyncpg.connect(primary.url(), ssl=False)
    try:
        standby.pause()
        await asyncio.sleep(PAST_LEASE)
        # Refused before the commit record: nothing waits for the standby.
        with pytest.raises(asyncpg.PostgresError) as refused:
            await session.execute(_WRITE, _key(), timeout=10)
        assert _is_lease_refusal(refused.value)
        with pytest.raises(asyncpg.PostgresError) as refused:
            await session.execute("SELECT booking_sync_barrier()", timeout=10)
        assert _is_lease_refusal(refused.value)
        assert await _waiting_for_standby(primary) == set()

        # The standby answers again: the retry commits.
        standby.resume()
        while True:
            try:
                await session.execute(_WRITE, _key())
                break
            except asyncpg.PostgresError as exc:
                assert _is_lease_refusal(exc)
                await asyncio.sleep(0.1)

        # Replication made asynchronous (Patroni's non-strict mode once the
        # synchronous standby is gone): no lease to check, writes commit.
        standby.pause()
        await cluster.set_synchronous("")
        await asyncio.sleep(PAST_LEASE)
        await session.execute(_WRITE, _key())
        assert await primary.fetchval("SELECT count(*) FROM login_throttle") == 2
    finally:
        session.terminate()
        if standby.paused:
            standby.resume()


# The lease's residual window: a resumed node may read from its sockets the
# replies its standby sent until its promotion, dated about the promotion,
# and for a moment the lease looks held. Here the lease is truly held (the
# standby is not promoted and answers again as soon as the primary resumes;
# a lease of a minute covers the moment before its first reply), so only
# the caller's time bound (booking_commit_by, stamped by storage/database.py
# on every write) can refuse what waited in the frozen node's sockets. A
# freeze long enough for a promotion is longer than any bound.
_WIDE_LEASE = "SET booking.standby_lease = '60s'"
_BOUND = 1.0  # seconds from the stamp to the write's bound
_STAMPED_WRITE = (
    "WITH written AS (INSERT INTO login_throttle (email_key, failures) VALUES ($1, 1)"
    " RETURNING 1) SELECT count(*) FROM written WHERE booking_commit_by($2::timestamptz)"
)


async def test_a_frozen_primary_refuses_stamped_writes_that_waited_past_their_bound(
    cluster: ReplicatedCluster,
) -> None:
    old = cluster.primary
    sessions = [await asyncpg.connect(old.url(), ssl=False) for _ in range(4)]
    unstamped, single, transaction, barrier = sessions
    try:
        for session in sessions:
            await session.execute(_WIDE_LEASE)
        await unstamped.execute("BEGIN")
        await unstamped.execute(_WRITE, _key())
        bound = await old.fetchval(f"SELECT clock_timestamp() + interval '{_BOUND} s'")
        for session in (transaction, barrier):
            await session.execute("BEGIN")
            await session.execute("SELECT booking_commit_by($1)", bound)
        await transaction.execute(_WRITE, _key())
        pids = [s.get_server_pid() for s in sessions]

        old.pause()
        tasks = {
            pids[0]: asyncio.create_task(unstamped.execute("COMMIT")),
            pids[1]: asyncio.create_task(single.fetchval(_STAMPED_WRITE, _key(), bound)),
            pids[2]: asyncio.create_task(transaction.execute("COMMIT")),
            pids[3]: asyncio.create_task(barrier.execute("SELECT booking_sync_barrier()")),
        }
        await asyncio.sleep(_BOUND + 1.0)  # the statements wait in its sockets
        old.resume()

        outcome = await _settled(old, tasks)
        # The lease alone lets the unstamped commit through.
        assert outcome[pids[0]] == "committed", outcome
        # Every stamped statement is refused on its bound before its commit
        # record: the single write at its one-time filter, the COMMIT and
        # the barrier (what a replay runs) at their check.
        assert {pid: outcome[pid] for pid in pids[1:]} == dict.fromkeys(
            pids[1:], "CommitDeadlinePassed"
        ), outcome
        exc = tasks[pids[2]].exception()
        assert isinstance(exc, asyncpg.PostgresError)
        domain = errors.translate(exc)
        assert isinstance(domain, errors.CommitDeadlinePassed)
        assert code_for(domain) is grpc.StatusCode.UNAVAILABLE
        assert set(domain.metadata()) == {"commit_by"}
        # Only the unstamped write is on the node.
        assert await old.fetchval("SELECT count(*) FROM login_throttle") == 1
    finally:
        for session in sessions:
            session.terminate()


async def test_a_late_event_read_on_a_synchronous_primary_is_refused_before_its_barrier(
    cluster: ReplicatedCluster,
) -> None:
    # An event read's durability gate is a sync barrier, which commits a
    # logical message: with a synchronous standby, a write. Late (a bound
    # in the past, as for a statement that waited in a frozen node's
    # socket), it is refused before the barrier, as a write is.
    db = await Database.connect(cluster.primary.url(), min_size=1, max_size=1, commit_tolerance=-60)
    try:
        with pytest.raises(errors.CommitDeadlinePassed):
            await events.stable_head(db)
        with pytest.raises(errors.CommitDeadlinePassed):
            await events.read_after(db, Position.start(), EventFilter(), 10)
    finally:
        await db.close()
