"""The connection pool and the one transaction helper.

Every statement storage/ runs goes through :class:`Database`: :meth:`~Database.run`
for a transaction of several statements, and the asyncpg-style shortcuts
:meth:`~Database.fetch`, :meth:`~Database.fetchrow`, :meth:`~Database.fetchval`
and :meth:`~Database.execute` for one statement. Each call states its
:class:`Intent` (a required argument): whether it only reads or may write.
The intent decides how the call is run and retried, and it is what routes a
read to a standby. Every call picks its isolation level explicitly, retries
serialization failures and deadlocks with bounded, jittered backoff, and
turns database errors into domain errors (storage/errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import enum
import functools
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
from asyncpg.transaction import Transaction, TransactionState

from storage import consistency, deadline, durability, errors, hosts, replicas

log = logging.getLogger(__name__)

T = TypeVar("T")
Connection: TypeAlias = asyncpg.Connection  # Any: asyncpg is untyped


class Intent(enum.Enum):
    """What a call does to the database; every call says which.

    READ: it only reads. A multi-statement read runs in a READ ONLY
    transaction (the database refuses a write in it), and a read is tried
    again on another connection after a lost one: it cannot apply anything
    twice. Reads are what may be served by a standby.

    WRITE: it may change something. It runs on the primary, and after a lost
    connection it is tried again only when asyncpg refused it before
    anything was sent (the change might otherwise have committed). Within
    a request, a write's commit gives the request a read-your-writes token
    (storage/consistency.py) when reads are served by standbys.

    READ_PRIMARY: a read that must see the latest commit; see below.
    """

    READ = "read"
    WRITE = "write"
    # A read that must see the newest commit: it decides an authorization
    # (a token's revocation, a password), or reads inside a flow that then
    # writes on what it read. Run like READ (READ ONLY, retried after a lost
    # connection), but never on a standby, whose state may be older by its
    # replay lag (docs/reads.md, "What stays on the primary").
    READ_PRIMARY = "read_primary"

    @property
    def reads(self) -> bool:
        """Whether the call only reads (READ or READ_PRIMARY)."""
        return self is not Intent.WRITE


class Isolation(enum.StrEnum):
    # Only where every statement must see the newest committed row rather
    # than the snapshot (a contended counter: login throttling).
    READ_COMMITTED = "read_committed"
    REPEATABLE_READ = "repeatable_read"
    SERIALIZABLE = "serializable"

    @property
    def sql_name(self) -> str:
        return self.value.replace("_", " ")


# The session default; transitions run as one implicit transaction in it.
DEFAULT_ISOLATION = Isolation.REPEATABLE_READ


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 10
    base_delay: float = 0.002
    max_delay: float = 0.1

    def delay(self, attempt: int) -> float:
        # Full jitter: spreads a herd of losers instead of re-synchronising it.
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


_RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)

# Class 08 (connection), 53300 (too many connections) and 57P0x (shutdown):
# the database, not the request, is the problem. So is 25006 (read-only
# transaction): the session is on a node that is no longer the primary (a
# standby, or one being demoted); it is dropped and the next connect looks
# for the primary again (storage/hosts.py).
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "53300", "57P", "25006")

# How long returning a connection to the pool may take (rolling back an
# unfinished transaction, waiting for a cancel request): against a frozen
# server both would wait for it to come back, holding the pool slot and the
# call. Past this the connection is terminated instead.
RELEASE_TIMEOUT_SECONDS = 2.0
# Client-side bound on one statement beyond the session's statement_timeout
# (which a frozen server cannot enforce), for calls without a deadline.
COMMAND_TIMEOUT_MARGIN_SECONDS = 5.0


# The caller's time bound carried into each write transaction
# (docs/cluster.md, "A resumed old primary"): it must commit by the
# service's clock now plus the time the call can still wait (its deadline,
# the client-side statement bound, and at most this) plus the clock
# tolerance, or the database refuses it (COMMIT_DEADLINE_PASSED). A
# statement that waited in a frozen node's socket longer than that is
# refused when the node resumes. A promotion takes a freeze of at least the
# HA manager's TTL (20 s in the shipped configuration), more than this
# window plus the largest tolerance the configuration accepts (5 s).
MAX_COMMIT_WINDOW_SECONDS = 10.0
DEFAULT_COMMIT_TOLERANCE_SECONDS = 1.0

# The bound of the write the current task is running, as the one-time filter
# of a single statement needs it (:func:`stamped`).
_commit_by: contextvars.ContextVar[datetime.datetime | None] = contextvars.ContextVar(
    "booking_commit_by", default=None
)

# What a stamped statement contains; a single-statement write without it is
# refused before it is sent (:class:`_StampedStatements`).
_STAMP = "booking_commit_by($"


class UnstampedWrite(RuntimeError):
    """A single-statement write sent without its time bound: a programming
    error (the statement did not go through :func:`stamped`), refused before
    anything reached the database."""


def stamped(sql: str, args: Sequence[object]) -> tuple[str, list[object]]:
    """A single-statement write (a SELECT of an SQL function, without a
    WHERE clause of its own) with the current write's bound as its one-time
    filter: ``WHERE booking_commit_by($N)`` runs before the rest of the
    statement, stamps the implicit transaction for its COMMIT check, and
    refuses a statement that arrives late. Outside a write run by
    :class:`Database` (no bound), the statement unchanged. No extra round
    trip: the bound travels as one more parameter."""
    bound = _commit_by.get()
    if bound is None:
        return sql, list(args)
    return f"{sql} WHERE booking_commit_by(${len(args) + 1}::timestamptz)", [*args, bound]


class _StampedStatements:
    """The connection a single-statement write's work is given: each
    statement it sends must carry the bound (:func:`stamped`), so no write
    can leave without it; one that does not is refused before it is sent
    (UnstampedWrite). Everything else is the connection's."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    @staticmethod
    def _check(sql: str) -> None:
        if _STAMP not in sql:
            raise UnstampedWrite(f"a single-statement write without its bound: {sql[:80]!r}")

    async def fetch(self, sql: str, *args: object, **kwargs: Any) -> Any:
        self._check(sql)
        return await self._conn.fetch(sql, *args, **kwargs)

    async def fetchrow(self, sql: str, *args: object, **kwargs: Any) -> Any:
        self._check(sql)
        return await self._conn.fetchrow(sql, *args, **kwargs)

    async def fetchval(self, sql: str, *args: object, **kwargs: Any) -> Any:
        self._check(sql)
        return await self._conn.fetchval(sql, *args, **kwargs)

    async def execute(self, sql: str, *args: object, **kwargs: Any) -> Any:
        self._check(sql)
        return await self._conn.execute(sql, *args, **kwargs)


class _StampedTransaction(Transaction):  # type: ignore[misc]  # asyncpg is untyped
    """A top-level read-write transaction whose BEGIN also stamps it with
    its bound (booking_commit_by), in the same simple query: no extra round
    trip. Otherwise asyncpg's Transaction (savepoints nest in it)."""

    def __init__(self, conn: Connection, isolation: Isolation, commit_by: datetime.datetime):
        # The connection itself, as Connection.transaction() gives it (a
        # pool's proxy forwards the call to it).
        if isinstance(conn, asyncpg.pool.PoolConnectionProxy):
            conn = conn._con
        super().__init__(conn, isolation.value, False, False)
        self._begin = (
            f"BEGIN ISOLATION LEVEL {isolation.sql_name.upper()};"
            f" SELECT booking_commit_by('{commit_by.isoformat()}'::timestamptz);"
        )

    async def start(self) -> None:
        con = self._connection
        if con._top_xact is not None or con._protocol.is_in_transaction():
            raise asyncpg.InterfaceError("a stamped transaction starts outside any other")
        con._top_xact = self
        try:
            await con.execute(self._begin)
        except BaseException:
            # Not left as the connection's transaction: the pool's reset rolls
            # back the failed one, and the next starts afresh.
            con._top_xact = None
            self._state = TransactionState.FAILED
            raise
        self._state = TransactionState.STARTED


def went_away(exc: BaseException, conn: Connection | None = None) -> bool:
    """Whether `exc` means the database or the connection to it is gone.

    asyncpg reports a connection lost under an operation in several ways:
    ConnectionDoesNotExistError, InterfaceError on a closed connection,
    OSError from the socket, and (when the server ended the session between
    two operations) InternalClientError "cannot switch to state ...". Other
    InterfaceErrors (wrong argument count, unencodable values) are bugs here,
    not outages, unless the connection turned out closed.
    """
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "").startswith(_UNAVAILABLE_SQLSTATE_PREFIXES)
    if isinstance(exc, OSError):  # TimeoutError included
        return True
    if isinstance(exc, asyncpg.exceptions.OutdatedSchemaCacheError):
        return False
    if isinstance(exc, (asyncpg.InternalClientError, asyncpg.ConnectionDoesNotExistError)):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return conn is None or _closed(conn) or "connection is closed" in str(exc)
    return False


def _closed(conn: Connection) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        # asyncpg returned a connection it saw close to the pool already and
        # detached it from our proxy.
        return True


def _nothing_sent(exc: BaseException) -> bool:
    """Whether asyncpg refused the operation before sending it: the
    connection was already broken, so no statement ran and even a write can
    be retried on another connection."""
    if isinstance(exc, asyncpg.InternalClientError):
        # Raised by the protocol's state check before it writes; its
        # subclasses (ProtocolError...) can come after a statement was sent.
        return type(exc) is asyncpg.InternalClientError and "cannot switch to state" in str(exc)
    return (
        isinstance(exc, asyncpg.InterfaceError)
        and not isinstance(exc, asyncpg.ConnectionDoesNotExistError)
        and "connection is closed" in str(exc)
    )


class _Broken(Exception):
    """A pooled connection broke under `work` (the cause is chained)."""

    def __init__(self, retry_safe: bool) -> None:
        super().__init__("database connection lost")
        self.retry_safe = retry_safe


def _describe(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc is not None else "unknown"


async def _reset(conn: Connection) -> None:
    """Make a connection safe to hand out again.

    asyncpg's default reset costs a round trip on every release (advisory
    unlock, CLOSE ALL, UNLISTEN, RESET ALL), which profiling showed at ~10%
    of a hold's server CPU. Pooled sessions here never take advisory locks,
    open cursors, LISTEN or SET anything, so only an unfinished transaction
    needs undoing."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _durable_commits(conn: Connection) -> None:
    """Commits must be durable before they are visible: event cursors rely
    on it across crash recovery (docs/events.md). Raises a cluster, database
    or role default of 'off' to 'on' for the session; any other value also
    waits for the local flush and stays as configured (remote_apply must not
    be lowered). A session setting, so it lasts: _reset never runs RESET ALL."""
    await conn.execute(
        "SELECT set_config('synchronous_commit', 'on', false)"
        " WHERE current_setting('synchronous_commit') = 'off'"
    )


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def tls_options(dsn: str) -> dict[str, Any]:
    """No TLS negotiation with a database on this host, unless the DSN asks
    for it (sslmode). The default, sslmode=prefer, first asks the server for
    TLS: a wasted round trip over loopback, and an asyncpg path that, when a
    connect is interrupted in it, leaves a failed future asyncio logs as an
    error ("unexpected connection_lost() call")."""
    parts = urlsplit(dsn)
    if "ssl" in parse_qs(parts.query) or "sslmode" in parse_qs(parts.query):
        return {}
    try:
        names = {h.host for h in hosts.parse(dsn).hosts}
    except ValueError:
        return {}
    return {"ssl": False} if names <= _LOOPBACK else {}


async def _connect_to_completion(*args: Any, **kwargs: Any) -> Connection:
    """asyncpg.connect, not interrupted by the cancellation of the call that
    needed it.

    A client that gives up (deadline, disconnect) cancels its handler, and
    with it any pool connect in progress. Cancelled during the TLS probe of
    sslmode=prefer (the default), asyncpg leaves a failed future nobody
    awaits, and asyncio logs it with a traceback, once per cancelled call.
    Finished in the background instead, the connection is closed if no
    caller is left for it; the pool makes a new one when needed.
    """
    finder = kwargs.pop("finder", None)
    if finder is None:
        finder = hosts.Finder(str(args[0]) if args else kwargs.pop("dsn"))
    task = asyncio.ensure_future(finder.connect(**kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_close_orphan)
        raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _close_orphan(task: asyncio.Future[Connection]) -> None:
    if task.cancelled() or task.exception() is not None:
        return  # retrieved, so not logged
    task.result().terminate()


async def _create_pool(
    finder: hosts.Finder,
    *,
    min_size: int,
    max_size: int,
    statement_timeout_ms: int,
    connect_timeout: float,
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        # Every connect goes through the Finder: the primary among the URL's
        # hosts, a per-host timeout, a session checked to be writable.
        finder=finder,
        min_size=min_size,
        max_size=max_size,
        reset=_reset,
        init=_durable_commits,
        connect=_connect_to_completion,
        # Bounds every (re)connect the pool makes, so a stalled server
        # turns into UNAVAILABLE instead of a call hanging for a minute.
        timeout=connect_timeout,
        command_timeout=statement_timeout_ms / 1000 + COMMAND_TIMEOUT_MARGIN_SECONDS,
        server_settings={
            "application_name": "booking-service",
            "default_transaction_isolation": DEFAULT_ISOLATION.sql_name,
            "timezone": "UTC",
            "statement_timeout": str(statement_timeout_ms),
            "idle_in_transaction_session_timeout": "60000",
            # Plans here are tiny; JIT compilation would only add latency.
            "jit": "off",
        },
    )
    assert pool is not None
    return pool


async def _standby_pool(
    args: dict[str, Any], url: str, max_size: int, connect_timeout: float
) -> asyncpg.Pool:
    """A pool on one standby: sessions like the primary's, connected lazily
    (min_size 0) within the per-standby check time."""
    return await _create_pool(
        hosts.Finder(url),
        min_size=0,
        max_size=max_size,
        statement_timeout_ms=args["statement_timeout_ms"],
        connect_timeout=connect_timeout,
    )


# The primary's position after a commit, and its timeline (as hosts.py reads it).
_TOKEN_SQL = (
    "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8,"
    " ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
)


class Database:
    """An asyncpg pool whose sessions default to REPEATABLE READ."""

    def __init__(
        self, pool: asyncpg.Pool, retry: RetryPolicy, dsn: str, pool_args: dict[str, Any]
    ) -> None:
        self.pool = pool
        self.retry = retry
        self.dsn = dsn
        self.finder = hosts.Finder(dsn)
        self._pool_args = pool_args
        # While False (a server waiting for its database to come up, or for
        # migrations), every run() is DatabaseUnavailable without touching
        # the database: no query meets a schema that is not there yet.
        self.accepting = True
        self._probe: Connection | None = None
        # Observability hooks, set by the server (storage knows no telemetry):
        # called with the error's name before each retry of a conflict, and
        # around each attempt of a transaction (a tracing span).
        self.on_retry: Callable[[str], None] | None = None
        self.span: Callable[[Callable[..., Any], int], AbstractContextManager[None]] | None = None
        # Calls waiting for a pooled connection right now.
        self.acquiring = 0
        # Commits made visible without the synchronous standbys (storage/durability.py).
        self.commits = durability.CommitWatch()
        # The standbys Intent.READ calls go to (None: everything on the
        # primary), and the primary's cluster identity, read once.
        self.standbys: replicas.Standbys | None = None
        self.system_id: int | None = None
        # The clock skew allowed between this host and the database's when
        # a write's bound is checked there (MAX_COMMIT_WINDOW_SECONDS).
        self.commit_tolerance = DEFAULT_COMMIT_TOLERANCE_SECONDS

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        statement_timeout_ms: int = 30_000,
        connect_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        deferred: bool = False,
        reads: replicas.Settings | None = None,
        commit_tolerance: float = DEFAULT_COMMIT_TOLERANCE_SECONDS,
    ) -> Database:
        """A connected pool; with ``deferred``, one that has not connected
        yet (so it cannot fail) and refuses work until :meth:`open`."""
        args: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "statement_timeout_ms": statement_timeout_ms,
            "connect_timeout": connect_timeout,
        }
        finder = hosts.Finder(dsn)
        pool = await _create_pool(finder, **(args | {"min_size": 0} if deferred else args))
        db = cls(pool, retry or RetryPolicy(), dsn, args)
        db.finder = finder
        db.accepting = not deferred
        db.commit_tolerance = commit_tolerance
        if reads is not None:
            db.standbys = replicas.Standbys(reads, functools.partial(_standby_pool, args))
        return db

    async def open(self) -> None:
        """Connect the pool of a deferred Database (min_size connections;
        raises if the database cannot be reached) and accept work."""
        if self.accepting:
            return
        # The placeholder (min_size 0, never used while not accepting) is
        # replaced, so min_size keeps its floor of idle connections.
        pool = await _create_pool(self.finder, **self._pool_args)
        placeholder, self.pool = self.pool, pool
        await placeholder.close()
        self.accepting = True

    async def close(self) -> None:
        self._drop_probe()
        if self.standbys is not None:
            await self.standbys.close()
        await self.pool.close()

    async def run(
        self,
        work: Callable[[Connection], Awaitable[T]],
        *,
        intent: Intent,
        isolation: Isolation = DEFAULT_ISOLATION,
        single_statement: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - also cancels on the server
    ) -> T:
        """Run `work` in a transaction at `isolation`, retrying conflicts.

        `intent` says whether `work` only reads (Intent.READ: a READ ONLY
        transaction, retried after a lost connection) or may write.

        It gets `timeout` seconds, by default the time left to the current
        request's deadline (storage.deadline), retries and waiting for a
        connection included. When they run out the statement is cancelled
        on the server, the transaction rolled back, and the error is
        DeadlineExceeded. Without either, only the session's
        statement_timeout applies.

        With ``single_statement`` the work is one statement that runs as its
        own implicit transaction at the session default (REPEATABLE READ):
        one round trip instead of three (the shortcuts below are such work).
        `work` must not await anything but the database: no transaction
        stays open across a network call.

        A connection that broke under `work` is terminated, so it leaves the
        pool, and the error is DatabaseUnavailable. The work is tried again
        on another connection when that cannot apply a change twice: when
        asyncpg refused it before sending anything (a pooled session the
        server had already ended), or when the intent is READ.
        """
        if not isinstance(intent, Intent):
            raise TypeError(f"intent must be an Intent, not {intent!r}")
        if single_statement and isolation is not DEFAULT_ISOLATION:
            raise ValueError("single statements run at the session default isolation")
        if not self.accepting:
            raise errors.DatabaseUnavailable()
        limit = deadline.remaining() if timeout is None else timeout
        if limit is None:
            return await self._run(work, intent, isolation, single_statement, None)
        if limit <= 0:
            raise errors.DeadlineExceeded()
        # Cancelling the task cancels the statement: asyncpg sends the server
        # a cancel request, and the pool's reset rolls the transaction back.
        bounded = asyncio.timeout(limit)
        until = time.monotonic() + limit
        try:
            async with bounded:
                return await self._run(work, intent, isolation, single_statement, until)
        except TimeoutError as exc:
            if bounded.expired():
                raise errors.DeadlineExceeded() from exc
            raise

    # One statement, asyncpg-style. Each runs as its own implicit transaction
    # (one round trip) within the request's deadline; a READ is a statement
    # that only reads.

    async def fetch(self, sql: str, *args: object, intent: Intent) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._statement("fetch", sql, args, intent)
        return rows

    async def fetchrow(self, sql: str, *args: object, intent: Intent) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._statement("fetchrow", sql, args, intent)
        return row

    async def fetchval(self, sql: str, *args: object, intent: Intent) -> Any:
        return await self._statement("fetchval", sql, args, intent)

    async def execute(self, sql: str, *args: object, intent: Intent) -> str:
        return str(await self._statement("execute", sql, args, intent))

    async def _statement(
        self,
        method: str,
        sql: str,
        args: tuple[object, ...],
        intent: Intent,
    ) -> Any:
        async def work(conn: Connection) -> Any:
            return await getattr(conn, method)(sql, *args)

        # Named after the storage function that called fetch() & co. (two
        # frames up), as its own closure was: the tracing span's name.
        work.__qualname__ = f"{sys._getframe(2).f_code.co_qualname}.work"
        # A write shortcut runs in a stamped transaction (its BEGIN carries
        # the bound): its SQL cannot take a one-time filter of its own.
        return await self.run(work, intent=intent, single_statement=intent.reads)

    async def _run(
        self,
        work: Callable[[Connection], Awaitable[T]],
        intent: Intent,
        isolation: Isolation,
        single_statement: bool,
        until: float | None,
    ) -> T:
        attempt = 0
        # One retry per pooled connection (each may be a dead one) plus one.
        lost_budget = self.pool.get_max_size() + 1
        while True:
            try:
                with self.span(work, attempt) if self.span else contextlib.nullcontext():
                    return await self._once(work, intent, isolation, single_statement, until)
            except _Broken as broken:
                cause = broken.__cause__
                lost_budget -= 1
                if lost_budget > 0 and (broken.retry_safe or intent.reads):
                    continue
                # Not a warning per call: during an outage every call fails so,
                # the RPC log line names DATABASE_UNAVAILABLE and the health
                # monitor reports the outage once.
                log.debug("database connection lost: %s", _describe(cause))
                raise errors.DatabaseUnavailable() from cause
            except asyncpg.PostgresError as exc:
                if went_away(exc):
                    raise errors.DatabaseUnavailable() from exc
                if isinstance(exc, asyncpg.QueryCanceledError):
                    # statement_timeout: the database is overloaded or a lock
                    # is held too long; nothing the client sent is at fault.
                    raise errors.DatabaseTimeout() from exc
                retryable = isinstance(exc, _RETRYABLE) or (
                    isinstance(exc, asyncpg.UniqueViolationError | asyncpg.ExclusionViolationError)
                    and getattr(exc, "constraint_name", None) in errors.RETRYABLE_CONSTRAINTS
                )
                if not retryable:
                    domain = errors.translate(exc)
                    if domain is None:
                        raise
                    raise domain from exc
                attempt += 1
                if attempt >= self.retry.attempts:
                    raise errors.TransactionConflict(attempts=attempt) from exc
                if self.on_retry is not None:
                    self.on_retry(type(exc).__name__)
                await asyncio.sleep(self.retry.delay(attempt))

    def _pool_for(self, intent: Intent) -> asyncpg.Pool:
        """The primary's pool: every call but an Intent.READ served by a
        standby (:meth:`_standby` decides that one)."""
        del intent
        return self.pool

    async def _standby(self, intent: Intent) -> replicas.Lease | None:
        """A checked standby session for a READ, or None: the primary."""
        if intent is not Intent.READ or self.standbys is None:
            return None
        request = consistency.current()
        wanted = request.wanted if request is not None else None
        if wanted is not None and self.system_id is not None and wanted.system != self.system_id:
            return None  # another cluster's token: the primary answers
        return await self.standbys.acquire(wanted, deadline.remaining())

    def _commit_by(self, until: float | None) -> datetime.datetime:
        """The bound of a write sent now: by the service's wall clock, the
        time it can still wait (its deadline `until` on the monotonic clock,
        the client-side statement bound, MAX_COMMIT_WINDOW_SECONDS), plus
        the clock tolerance."""
        window = min(
            MAX_COMMIT_WINDOW_SECONDS,
            self._pool_args["statement_timeout_ms"] / 1000 + COMMAND_TIMEOUT_MARGIN_SECONDS,
        )
        if until is not None:
            window = min(window, max(0.0, until - time.monotonic()))
        return datetime.datetime.fromtimestamp(
            time.time() + window + self.commit_tolerance, datetime.UTC
        )

    async def _once(
        self,
        work: Callable[[Connection], Awaitable[T]],
        intent: Intent,
        isolation: Isolation,
        single_statement: bool,
        until: float | None,
    ) -> T:
        lease = await self._standby(intent)
        if lease is not None:
            return await self._on_standby(lease, work, isolation, single_statement)
        pool = self._pool_for(intent)
        self.acquiring += 1
        try:
            conn = await pool.acquire()
        except asyncpg.PostgresError:
            raise  # 08xxx, 57P03 (starting up), 53300: run() maps them
        except Exception as exc:
            # Refused, timed out or reset while (re)connecting.
            if went_away(exc):
                raise errors.DatabaseUnavailable() from exc
            raise
        finally:
            self.acquiring -= 1
        # The caller's bound rides with a write (docs/cluster.md, "A resumed
        # old primary"): in its BEGIN, or as a single statement's one-time
        # filter (stamped()).
        commit_by = self._commit_by(until) if intent is Intent.WRITE else None
        stamp = _commit_by.set(commit_by)
        try:
            self.commits.install(conn)
            if intent is not Intent.WRITE:
                if single_statement:
                    result = await work(conn)
                else:
                    async with conn.transaction(isolation=isolation.value, readonly=True):
                        result = await work(conn)
            elif single_statement:
                result = await work(_StampedStatements(conn))
            else:
                assert commit_by is not None
                async with _StampedTransaction(conn, isolation, commit_by):
                    result = await work(conn)
            if self.commits.unreplicated(conn):
                # Committed, but maybe not on the synchronous standbys: never
                # answered as done (storage/durability.py).
                raise errors.DatabaseUnavailable()
            if intent is Intent.WRITE:
                await self._issue_token(conn)
            return result
        except Exception as exc:
            if not went_away(exc, conn):
                if self.commits.unreplicated(conn):
                    # A failure remembered by a commit that may not be
                    # replicated is not answered either.
                    raise errors.DatabaseUnavailable() from exc
                raise
            # Terminated here, the pool replaces it on the next acquire
            # instead of handing the broken session to another call. (A
            # connection asyncpg saw close is already back in the pool,
            # detached from this proxy.)
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
            raise _Broken(retry_safe=_nothing_sent(exc)) from exc
        finally:
            _commit_by.reset(stamp)
            self.commits.uninstall(conn)
            await self._release(pool, conn)

    async def _on_standby(
        self,
        lease: replicas.Lease,
        work: Callable[[Connection], Awaitable[T]],
        isolation: Isolation,
        single_statement: bool,
    ) -> T:
        """Run a READ on the standby session `lease` checked for it. A
        session that breaks leaves the node out for a while; the read is
        tried again (elsewhere)."""
        conn = lease.conn
        assert self.standbys is not None
        try:
            if single_statement:
                return await work(conn)
            async with conn.transaction(isolation=isolation.value, readonly=True):
                return await work(conn)
        except Exception as exc:
            if not went_away(exc, conn):
                raise
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
            self.standbys.mark_down(lease.node, _describe(exc))
            raise _Broken(retry_safe=True) from exc
        finally:
            await self.standbys.release(lease.node, conn)

    async def _issue_token(self, conn: Connection) -> None:
        """Give the current request the primary's WAL position after its
        commit (one more round trip, only while standbys serve reads and a
        request is there to carry it). A session that fails here has
        committed already: the write is answered, just without a token."""
        request = consistency.current()
        if request is None or self.standbys is None:
            return
        try:
            if self.system_id is None:
                self.system_id = int(await conn.fetchval(replicas.SYSTEM_SQL))
            row = await conn.fetchrow(_TOKEN_SQL)
        except Exception as exc:  # noqa: BLE001 - the commit stands; no token
            log.debug("no consistency token: %s", _describe(exc))
            return
        request.record(consistency.Token(self.system_id, int(row[1]), int(row[0])))

    async def _release(self, pool: asyncpg.Pool, conn: Connection) -> None:
        """Return `conn` to the pool within RELEASE_TIMEOUT_SECONDS (past
        that the pool terminates it). The release runs as a task of its own
        that finishes even if this call is cancelled meanwhile, and whose
        failure is always retrieved (asyncpg's own shield would leave a
        timed-out release's TimeoutError to asyncio's "never retrieved"
        log)."""
        task = asyncio.ensure_future(pool.release(conn, timeout=RELEASE_TIMEOUT_SECONDS))
        task.add_done_callback(_retrieve)
        # InterfaceError: a connection asyncpg saw close is back in the pool,
        # detached from the proxy; InternalClientError: one terminated above
        # freed its holder before the task ran.
        with contextlib.suppress(asyncpg.InterfaceError, asyncpg.InternalClientError, TimeoutError):
            await asyncio.shield(task)

    async def ping(self, within: float = 2.0) -> bool:
        """Whether the database answers ``SELECT 1`` within `within` seconds.

        The probe has its own connection, so a busy pool does not read as a
        dead database, and a stalled server (one that accepts connections or
        holds them open but never answers) reads as unreachable after
        `within` seconds instead of never. A probe connection that failed or
        timed out is terminated and made afresh next time.
        """
        try:
            async with asyncio.timeout(within):
                if self._probe is None or self._probe.is_closed():
                    self._probe = await _connect_to_completion(
                        finder=self.finder,
                        timeout=within,
                        server_settings={"application_name": "booking-health"},
                    )
                await self._probe.fetchval("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            self._drop_probe()
            await self._expire()
            return False

    async def _expire(self) -> None:
        """The primary stopped answering the probe: look for it afresh on
        the next connect, and replace the pool's connections (idle ones at
        their next acquire, busy ones when released), so no call keeps
        waiting on a hung node that a failover has replaced, and none is
        sent to it when it resumes demoted."""
        self.finder.forget()
        with contextlib.suppress(Exception):
            await self.pool.expire_connections()

    def _drop_probe(self) -> None:
        if self._probe is not None:
            self._probe.terminate()
            self._probe = None
