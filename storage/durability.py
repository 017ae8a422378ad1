"""Nothing is answered as done before it is on the synchronous standbys.

With synchronous replication a commit waits, after it is written to the
primary's WAL, for the synchronous standbys to acknowledge it. Until then
it is invisible. But a backend whose wait is cancelled (a cancel request,
such as the one asyncpg sends when a deadline cancels a statement) or
terminated, or that is waiting when PostgreSQL restarts, makes the commit
visible on the primary although no standby has it; a failover then loses
it. Two kinds of answer could pass on such a commit as done:

- a replay: a retry with the same request id finds the stored outcome and
  answers it;
- a read: the event stream delivers what it reads on the primary.

The guard is a *sync barrier* (``booking_sync_barrier()``, storage/sql/
durability.sql): the transaction that answers writes a WAL record of its
own, so its commit waits for the synchronous standbys like any write. WAL
is one sequence, and a standby acknowledges a position only once it has
everything before it, so when that wait ends normally every commit the
transaction could see (all of them earlier in the WAL) is on the
synchronous standbys, whichever standbys are synchronous at that moment.
The barrier writes nothing when ``synchronous_standby_names`` is empty:
then no commit waits for a standby and there is nothing to gate (a single
PostgreSQL pays one function call).

A barrier, like any commit, can itself be cancelled into a local commit.
PostgreSQL then warns the client ("canceling wait for synchronous
replication … already committed locally, but might not have been
replicated") and reports success. :class:`CommitWatch` listens for that
warning on every pooled connection, and ``Database.run`` turns a
transaction that received it into DatabaseUnavailable: the commit (a
transition or a barrier) may not survive a failover, so it is never
answered as done; the client retries with its request id. A terminated
wait ends the connection, which is DatabaseUnavailable already.

docs/events.md and docs/cluster.md ("Durability: what is guaranteed") give
the reasoning in full.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.database import Connection, Database

log = logging.getLogger(__name__)

# A statement of its own: one implicit transaction whose commit is the barrier.
BARRIER = "SELECT booking_sync_barrier()"


def _unreplicated_warning(message: Any) -> bool:
    """Whether a server message says a commit's wait for the synchronous
    standbys was given up (cancelled, or the session terminated)."""
    detail = str(getattr(message, "detail", None) or "")
    text = str(getattr(message, "message", None) or "")
    return "committed locally" in detail or (
        "synchronous replication" in text and "canceling" in text
    )


@dataclass
class CommitWatch:
    """Remembers the pooled sessions whose last commit was made visible
    without the synchronous standbys' acknowledgement.

    Keyed by backend pid (a pool's sessions are on one server at a time);
    an entry is cleared when its connection is next acquired."""

    _pids: set[int] = field(default_factory=set)

    def install(self, conn: Any) -> None:
        """Listen for the warning on `conn` while it is acquired (asyncpg
        drops a pooled connection's listeners when it is released)."""
        self._pids.discard(_pid(conn))
        conn.add_log_listener(self._on_message)

    def uninstall(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # a closed or detached connection
            conn.remove_log_listener(self._on_message)

    def _on_message(self, conn: Any, message: Any) -> None:
        if _unreplicated_warning(message):
            self._pids.add(_pid(conn))

    def unreplicated(self, conn: Any) -> bool:
        """Whether `conn` received the warning since it was last asked.

        asyncpg schedules log listeners as the server's messages arrive, and
        the warning comes before the statement's ReadyForQuery, so by the
        time a statement's result is returned the listener has run."""
        pid = _pid(conn)
        if pid in self._pids:
            self._pids.discard(pid)
            log.warning(
                "a commit was made visible before the synchronous standbys acknowledged it"
                " (its wait was cancelled); answered UNAVAILABLE"
            )
            return True
        return False


def _pid(conn: Any) -> int:
    try:
        return int(conn.get_server_pid())
    except Exception:  # noqa: BLE001 - a detached proxy: no session to speak of
        return -1


async def barrier(conn: Any) -> None:
    """Run a sync barrier on `conn` (idle, not in a transaction): returns
    once everything committed before it is on the synchronous standbys."""
    await conn.execute(BARRIER)


_SETTINGS_SQL = """
SELECT current_setting('synchronous_standby_names') AS names,
       current_setting('synchronous_commit') AS sync_commit,
       pg_is_in_recovery() AS recovery,
       (SELECT count(*) FROM pg_stat_replication) AS standbys,
       (SELECT count(*) FROM pg_stat_replication
         WHERE sync_state IN ('sync', 'quorum')) AS synchronous,
       (SELECT bool_and(pg_has_role(p.proowner, 'pg_read_all_stats', 'USAGE'))
          FROM pg_proc p WHERE p.proname = 'booking_standby_lease_held') AS lease_visible
"""


async def replication_warnings(db: Database) -> list[str]:
    from storage.database import Intent  # storage.database imports this module

    """What the service can see that makes its commits not synchronously
    replicated (a failover could then lose what it answered OK), as
    sentences for the log; empty when nothing is wrong or nothing is known.
    Read with a pooled session, so synchronous_commit is the one commits
    run with (storage/database.py raises 'off' to 'on')."""

    async def work(conn: Connection) -> Any:
        return await conn.fetchrow(_SETTINGS_SQL)

    # On the primary: a standby serving reads has no commits to describe.
    row = await db.run(work, single_statement=True, intent=Intent.READ_PRIMARY)
    if row is None or row["recovery"]:
        return []
    names, sync_commit = str(row["names"]), str(row["sync_commit"])
    standbys, synchronous = int(row["standbys"]), int(row["synchronous"])
    found = []
    if not names.strip():
        if standbys:
            found.append(
                f"{standbys} standby(s) stream from this primary but synchronous_standby_names"
                " is empty: commits are replicated asynchronously, and a failover can lose"
                " transitions already answered OK (docs/cluster.md)"
            )
        return found
    if sync_commit in ("local", "off"):
        found.append(
            f"synchronous_commit is {sync_commit!r}: commits do not wait for the synchronous"
            " standbys, and a failover can lose transitions already answered OK"
        )
    elif not synchronous:
        found.append(
            f"synchronous_standby_names is {names!r} but no synchronous standby is"
            " connected: every commit waits until one is"
        )
    if row["lease_visible"] is False:
        found.append(
            "the schema's owner cannot read pg_stat_replication's reply times (it needs"
            " pg_read_all_stats): the standby lease is not checked, and a primary that resumes"
            " after being replaced can take writes (docs/cluster.md)"
        )
    return found


async def warn_if_unreplicated(db: Database) -> None:
    """Log :func:`replication_warnings` (once: the server calls it when its
    database first becomes ready). Never fails the start."""
    try:
        warnings = await replication_warnings(db)
    except Exception as exc:  # noqa: BLE001 - a check, not a requirement
        log.info("could not read the replication settings: %s", type(exc).__name__)
        return
    for warning in warnings:
        log.warning("durability: %s", warning)
