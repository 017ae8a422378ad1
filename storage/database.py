"""The connection pool and the one transaction helper.

Every statement storage/ runs goes through :meth:`Database.run`, which
picks the isolation level explicitly, retries serialization failures and
deadlocks with bounded, jittered backoff, and turns database errors into
domain errors.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import asyncpg

from storage import errors

log = logging.getLogger(__name__)

T = TypeVar("T")
Connection: TypeAlias = asyncpg.Connection  # Any: asyncpg is untyped


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

# A concurrent request with the same request_id but other parameters can
# collide on the key itself; a retry then reports REQUEST_ID_REUSED.
_RETRYABLE_CONSTRAINTS = frozenset({"idempotency_keys_pkey"})

# Class 08 (connection), 53300 (too many connections) and 57P0x (shutdown):
# the database, not the request, is the problem.
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "53300", "57P")
_UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError)


def translate(exc: asyncpg.PostgresError) -> errors.BookingError | None:
    """The domain error for a database error, or None if it is unexpected."""
    if exc.sqlstate == "BK001":
        return _from_sql_function(exc)
    constraint = getattr(exc, "constraint_name", None)
    if isinstance(exc, asyncpg.UniqueViolationError) and constraint == "users_email_key":
        return errors.EmailTaken(email=_detail_value(exc) or "")
    if isinstance(exc, asyncpg.ExclusionViolationError) and constraint == "time_slots_no_overlap":
        # Key (specialist_id, tstzrange(...))=(<id>, [...)): the id comes first.
        return errors.SlotOverlap(specialist_id=(_detail_value(exc) or "").split(",")[0])
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        if constraint == "time_slots_specialist_id_fkey":
            return errors.SpecialistNotFound(id=_detail_value(exc) or "")
        if constraint in ("appointments_user_id_fkey", "access_tokens_user_id_fkey"):
            return errors.UserNotFound(id=_detail_value(exc) or "")
    if isinstance(
        exc, (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)
    ):
        return errors.InvalidValue(
            field=getattr(exc, "column_name", None) or "text",
            description="contains a character PostgreSQL cannot store (NUL)",
        )
    if isinstance(exc, (asyncpg.DatetimeFieldOverflowError, asyncpg.InvalidDatetimeFormatError)):
        return errors.InvalidValue(
            field=getattr(exc, "column_name", None) or "timestamp",
            description="timestamp out of range",
        )
    return None


def _detail_value(exc: asyncpg.PostgresError) -> str | None:
    """The value from a 'Key (col)=(value) ...' detail, when there is one."""
    detail = getattr(exc, "detail", None) or ""
    start = detail.find(")=(")
    if start < 0:
        return None
    end = detail.find(")", start + 3)
    return detail[start + 3 : end if end > 0 else None]


def _from_sql_function(exc: asyncpg.PostgresError) -> errors.BookingError:
    reason = str(getattr(exc, "message", ""))
    try:
        fields: dict[str, Any] = json.loads(getattr(exc, "detail", None) or "{}")
    except ValueError:
        fields = {}
    cls = errors.SQL_REASONS.get(reason)
    if cls is None:
        raise RuntimeError(f"SQL function raised unknown reason {reason!r}") from exc
    # The detail's keys are the error's fields (a test pins every
    # booking_fail call in storage/sql/ to this).
    return cls(**{key: str(value) for key, value in fields.items()})


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


class Database:
    """An asyncpg pool whose sessions default to REPEATABLE READ."""

    def __init__(self, pool: asyncpg.Pool, retry: RetryPolicy, dsn: str) -> None:
        self.pool = pool
        self.retry = retry
        self.dsn = dsn

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        statement_timeout_ms: int = 30_000,
        retry: RetryPolicy | None = None,
    ) -> Database:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            reset=_reset,
            init=_durable_commits,
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
        return cls(pool, retry or RetryPolicy(), dsn)

    async def close(self) -> None:
        await self.pool.close()

    async def run(
        self,
        work: Callable[[Connection], Awaitable[T]],
        *,
        isolation: Isolation = DEFAULT_ISOLATION,
        single_statement: bool = False,
    ) -> T:
        """Run `work` in a transaction at `isolation`, retrying conflicts.

        With ``single_statement`` the work is one statement that runs as its
        own implicit transaction at the session default (REPEATABLE READ):
        one round trip instead of three. `work` must not await anything but
        the database: no transaction stays open across a network call.
        """
        if single_statement and isolation is not DEFAULT_ISOLATION:
            raise ValueError("single statements run at the session default isolation")
        attempt = 0
        while True:
            try:
                async with self.pool.acquire() as conn:
                    if single_statement:
                        return await work(conn)
                    async with conn.transaction(isolation=isolation.value):
                        return await work(conn)
            except asyncpg.PostgresError as exc:
                if (exc.sqlstate or "").startswith(_UNAVAILABLE_SQLSTATE_PREFIXES):
                    raise errors.DatabaseUnavailable() from exc
                if isinstance(exc, asyncpg.QueryCanceledError):
                    # statement_timeout: the database is overloaded or a lock
                    # is held too long; nothing the client sent is at fault.
                    raise errors.DatabaseTimeout() from exc
                retryable = isinstance(exc, _RETRYABLE) or (
                    isinstance(exc, asyncpg.UniqueViolationError)
                    and getattr(exc, "constraint_name", None) in _RETRYABLE_CONSTRAINTS
                )
                if not retryable:
                    domain = translate(exc)
                    if domain is None:
                        raise
                    raise domain from exc
                attempt += 1
                if attempt >= self.retry.attempts:
                    raise errors.TransactionConflict(attempts=attempt) from exc
                await asyncio.sleep(self.retry.delay(attempt))
            except _UNAVAILABLE as exc:
                raise errors.DatabaseUnavailable() from exc

    async def ping(self) -> bool:
        try:
            async with self.pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            return False
