"""The benchmark's database: where it lives, what it holds, and how it is
reset between runs.

The harness never benchmarks against a database it did not create: it
starts an embedded PostgreSQL (or connects to DATABASE_URL) and makes a
scratch database there, which it drops at the end.

Load data uses deterministic ids, so every load generator (the gRPC
workers, the asyncpg workers and pgbench scripts) can name "slot k" and
"user k" without being sent lists of ids: ``pool_uuid(KIND, k)`` in Python
is ``sql_uuid(KIND, "k")`` in SQL.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg

from service import passwords
from storage import embedded, migrate
from storage import users as user_store
from storage.database import Database
from storage.models import Role

log = logging.getLogger(__name__)

# Id families (the first 32 bits of a pool uuid).
POOL_SLOT = 0xB0000001
POOL_USER = 0xB0000002
POOL_SPECIALIST = 0xB0000003
READ_SPECIALIST = 0xB0000004
READ_SLOT = 0xB0000005
SEARCH_SPECIALIST = 0xB0000006
SEARCH_SLOT = 0xB0000007

SLOT_MINUTES = 30
READ_SLOTS_PER_SPECIALIST = 1000
OPERATOR_PASSWORD = "bench-operator-password"

# The same server settings storage.database.Database uses for its pool.
SESSION_SETTINGS = {
    "application_name": "booking-bench",
    "default_transaction_isolation": "repeatable read",
    "timezone": "UTC",
    "jit": "off",
}


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, server_settings=SESSION_SETTINGS)


def pool_uuid(kind: int, k: int) -> UUID:
    return UUID(f"{kind:08x}-0000-4000-8000-{k:012x}")


def sql_uuid(kind: int, expr: str) -> str:
    """SQL for pool_uuid(kind, <expr>), where expr is an integer expression."""
    return f"('{kind:08x}-0000-4000-8000-' || lpad(to_hex(({expr})::bigint), 12, '0'))::uuid"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


async def create_database(admin_url: str, name: str, *, template: str | None = None) -> None:
    """A new scratch database (dropped first if a previous run left it)."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        copy = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
    finally:
        await conn.close()


async def drop_database(admin_url: str, name: str) -> None:
    await _drop_database(admin_url, name)


async def first_future_day(url: str) -> int:
    """Tomorrow, UTC midnight, in epoch seconds: where future slots begin."""
    conn = await connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT extract(epoch FROM date_trunc('day', now()) + interval '1 day')::bigint"
            )
        )
    finally:
        await conn.close()


@dataclass
class BenchDatabase:
    """A scratch database, on an embedded server or on DATABASE_URL's."""

    url: str
    admin_url: str
    name: str
    embedded: embedded.EmbeddedPostgres | None
    durable: bool

    def close(self) -> None:
        """Drop the scratch database and stop the server if we started it."""
        try:
            asyncio.run(_drop_database(self.admin_url, self.name))
        except Exception as exc:  # noqa: BLE001 - best effort at shutdown
            log.warning("could not drop %s: %s", self.name, exc)
        if self.embedded is not None and self.embedded.started_here:
            self.embedded.stop()


async def _drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def prepare(*, database_url: str | None, pg_dir: Path, durable: bool) -> BenchDatabase:
    """Start (or reach) PostgreSQL, create a scratch database and migrate it.

    Without `database_url` an embedded server is started with its data in
    `pg_dir`; with it, the scratch database is created on that server (the
    role needs CREATEDB)."""
    pg: embedded.EmbeddedPostgres | None = None
    if database_url:
        admin_url = database_url
    else:
        # max_connections: 2 replicas x pool + 64 direct clients + pgbench 64 + spare.
        pg = embedded.start(pg_dir, unsafe_fast=not durable, max_connections=300)
        admin_url = pg.url("postgres")
        if pg.started_here:
            _track_commit_timestamps(pg, admin_url)
    name = f"booking_bench_{secrets.token_hex(4)}"
    try:
        asyncio.run(_create_database(admin_url, name))
    except Exception:
        if pg is not None and pg.started_here:
            pg.stop()
        raise
    url = with_database(admin_url, name)
    bdb = BenchDatabase(url, admin_url, name, pg, durable)
    try:
        migrate.apply(url)
    except Exception:
        bdb.close()
        raise
    return bdb


def _track_commit_timestamps(pg: embedded.EmbeddedPostgres, admin_url: str) -> None:
    """Commit timestamps let the contention scenario check that every
    refusal came after a committed hold (a server restart to take effect)."""

    async def enable() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
        finally:
            await conn.close()

    asyncio.run(enable())
    # -l: without a log file the new postmaster would hold our output pipe open.
    log_file = str(pg.pgdata / "server.log")
    embedded.pg_ctl(pg.pgdata, "restart", "-m", "fast", "-w", "-t", "60", "-l", log_file)


async def hold_commit_times(url: str, first: int, count: int) -> dict[str, float] | None:
    """When the live appointment on each pool slot in [first, first+count)
    committed (epoch seconds); None when the server does not keep commit
    timestamps (track_commit_timestamp off)."""
    conn = await connect(url)
    try:
        if await conn.fetchval("SELECT current_setting('track_commit_timestamp')") != "on":
            return None
        rows = await conn.fetch(
            "SELECT time_slot_id::text AS id,"
            " extract(epoch FROM pg_xact_commit_timestamp(xmin)) AS committed"
            " FROM appointments WHERE status <> 'CANCELLED' AND time_slot_id = ANY($1::uuid[])",
            [pool_uuid(POOL_SLOT, k) for k in range(first, first + count)],
        )
    finally:
        await conn.close()
    return {r["id"]: float(r["committed"]) for r in rows if r["committed"] is not None}


@dataclass(frozen=True)
class Seeded:
    operator_id: str
    operator_email: str
    specialist_id: str
    pool_size: int


async def seed(url: str, pool_size: int) -> Seeded:
    """An OPERATOR who can log in, one specialist with `pool_size` slots,
    and `pool_size` CLIENT users (who never log in: operators hold for them)."""
    db = await Database.connect(url, min_size=1, max_size=1)
    try:
        email = f"bench-operator-{secrets.token_hex(4)}@bench.invalid"
        operator = await user_store.create(
            db,
            email=email,
            password_hash=await passwords.hash_password(OPERATOR_PASSWORD),
            role=Role.OPERATOR,
        )
    finally:
        await db.close()
    specialist = pool_uuid(POOL_SPECIALIST, 0)
    conn = await connect(url)
    try:
        await conn.execute(
            "INSERT INTO specialists (id, full_name, service_type) VALUES ($1, 'Bench', 'bench')",
            specialist,
        )
        await conn.execute(
            "INSERT INTO users (id, email, password_hash, role)"
            f" SELECT {sql_uuid(POOL_USER, 'g')}, 'bench-client-' || g || '@bench.invalid',"
            " 'no-login', 'CLIENT' FROM generate_series(0, $1 - 1) g",
            pool_size,
        )
        await conn.execute(
            "INSERT INTO time_slots (id, specialist_id, start_time, end_time)"
            f" SELECT {sql_uuid(POOL_SLOT, 'g')}, $2,"
            "  date_trunc('day', now()) + interval '1 day' + g * $3::interval,"
            "  date_trunc('day', now()) + interval '1 day' + (g + 1) * $3::interval"
            " FROM generate_series(0, $1 - 1) g",
            pool_size,
            specialist,
            timedelta(minutes=SLOT_MINUTES),
        )
        await conn.execute("VACUUM (ANALYZE) users, time_slots, specialists")
    finally:
        await conn.close()
    return Seeded(str(operator.id), email, str(specialist), pool_size)


async def reset(url: str) -> None:
    """Forget every appointment so each run starts from the same state:
    all pool slots AVAILABLE, no appointments, events or request ids."""
    conn = await connect(url)
    try:
        # Read committed: a sweep or a straggling call of the run before
        # may still change a slot, and at repeatable read the UPDATE below
        # would then fail (40001) instead of waiting and applying.
        await conn.execute("SET default_transaction_isolation = 'read committed'")
        await conn.execute(
            "TRUNCATE idempotency_keys, appointment_events, waitlist_entries,"
            " calendar_sequences, appointments, appointment_series"
        )
        # TRUNCATE fires no row trigger: the seat counts (storage/sql/seats.sql)
        # are reset here, and the status follows them.
        await conn.execute(
            "UPDATE time_slots SET seats_taken = 0, seats_held = 0, status = 'AVAILABLE'"
            " WHERE seats_taken <> 0 OR status <> 'AVAILABLE'"
        )
        await conn.execute("VACUUM (ANALYZE) time_slots, users, appointments, appointment_events")
    finally:
        await conn.close()


@dataclass(frozen=True)
class ReadsData:
    rows: int
    specialists: int
    slots_per_specialist: int
    total_slots: int
    load_seconds: float
    # The first loaded day (UTC midnight, epoch seconds) and how many whole
    # days every specialist has slots on.
    day0: int
    days: int


async def load_read_slots(url: str, rows: int) -> ReadsData:
    """Bulk-load `rows` slots for many specialists with generate_series
    (READ_SLOTS_PER_SPECIALIST each, 30 minutes apart), straight into SQL."""
    per = min(READ_SLOTS_PER_SPECIALIST, max(1, rows))
    specialists = -(-rows // per)
    started = time.monotonic()
    conn = await connect(url)
    try:
        await conn.execute(
            "INSERT INTO specialists (id, full_name, service_type)"
            f" SELECT {sql_uuid(READ_SPECIALIST, 's')}, 'Reader ' || s, 'bench-reads'"
            " FROM generate_series(0, $1 - 1) s",
            specialists,
        )
        await conn.execute(
            "INSERT INTO time_slots (id, specialist_id, start_time, end_time)"
            f" SELECT {sql_uuid(READ_SLOT, 'g')}, {sql_uuid(READ_SPECIALIST, 'g / $2')},"
            "  date_trunc('day', now()) + interval '1 day' + (g % $2) * $3::interval,"
            "  date_trunc('day', now()) + interval '1 day' + (g % $2 + 1) * $3::interval"
            " FROM generate_series(0, $1 - 1) g",
            rows,
            per,
            timedelta(minutes=SLOT_MINUTES),
        )
        await conn.execute("VACUUM (ANALYZE) time_slots, specialists")
        total = int(await conn.fetchval("SELECT count(*) FROM time_slots"))
        day0 = int(
            await conn.fetchval(
                "SELECT extract(epoch FROM date_trunc('day', now()) + interval '1 day')::bigint"
            )
        )
    finally:
        await conn.close()
    days = max(1, per * SLOT_MINUTES // (24 * 60))
    return ReadsData(rows, specialists, per, total, time.monotonic() - started, day0, days)


@dataclass(frozen=True)
class SearchData:
    rows: int
    specialists: int
    service_types: int
    load_seconds: float
    # The first loaded hour (epoch seconds) and how many whole days every
    # specialist has slots on.
    hour0: int
    days: int


SEARCH_SERVICE_TYPES = 10
SEARCH_SPECIALISTS = 1000


async def load_search_slots(url: str, rows: int) -> SearchData:
    """Bulk-load `rows` slots over up to 1,000 specialists of ten service
    types: each specialist's slots are an hour apart (30 minutes long,
    starting at a minute of the hour of its own), and three in ten are
    BOOKED, so a search filters as it would in life."""
    specialists = min(SEARCH_SPECIALISTS, max(1, rows // 100))
    per = -(-rows // specialists)
    started = time.monotonic()
    conn = await connect(url)
    try:
        await conn.execute(
            "INSERT INTO specialists (id, full_name, service_type)"
            f" SELECT {sql_uuid(SEARCH_SPECIALIST, 's')}, 'Searchable ' || s,"
            " 'search-' || (s % $2)"
            " FROM generate_series(0, $1 - 1) s",
            specialists,
            SEARCH_SERVICE_TYPES,
        )
        await conn.execute(
            "INSERT INTO time_slots (id, specialist_id, start_time, end_time, status)"
            f" SELECT {sql_uuid(SEARCH_SLOT, 'g')}, {sql_uuid(SEARCH_SPECIALIST, 'g / $2')},"
            "  h.t + (g % $2) * interval '1 hour' + (g / $2 % 60) * interval '1 minute',"
            "  h.t + (g % $2) * interval '1 hour' + (g / $2 % 60 + 30) * interval '1 minute',"
            # Scattered, not whole hours: a hash of the slot's number.
            "  CASE WHEN abs(hashint4(g)) % 10 < 3 THEN 'BOOKED' ELSE 'AVAILABLE' END::timeslot_status"
            " FROM generate_series(0, $1 - 1) g,"
            " (SELECT date_trunc('day', now()) + interval '1 day' AS t) h",
            per * specialists,
            per,
        )
        await conn.execute("VACUUM (ANALYZE) time_slots, specialists")
        hour0 = int(
            await conn.fetchval(
                "SELECT extract(epoch FROM date_trunc('day', now()) + interval '1 day')::bigint"
            )
        )
    finally:
        await conn.close()
    days = max(1, per // 24)
    return SearchData(
        per * specialists,
        specialists,
        SEARCH_SERVICE_TYPES,
        time.monotonic() - started,
        hour0,
        days,
    )


async def postmaster_pid(url: str) -> int | None:
    """The postmaster's pid, when the server runs on this machine (its
    backends are visible in /proc); None for a remote server."""
    conn = await asyncpg.connect(url)
    try:
        # Read while connected: the backend exits with the connection.
        return _postgres_parent(int(await conn.fetchval("SELECT pg_backend_pid()")))
    finally:
        await conn.close()


def _postgres_parent(backend: int) -> int | None:
    try:
        stat = Path(f"/proc/{backend}/stat").read_text()
    except OSError:
        return None
    ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
    try:
        comm = Path(f"/proc/{ppid}/comm").read_text().strip()
    except OSError:
        return None
    return ppid if comm.startswith("postgres") else None


SERIES_OCCURRENCES = 10
SLOTS_PER_DAY = 24 * 60 // SLOT_MINUTES


def series_first(k: int) -> int:
    """The first pool slot of bench series k: series take the slots of
    SERIES_OCCURRENCES consecutive days at one time of day, so each block
    of that many days holds SLOTS_PER_DAY series."""
    block, within = divmod(k, SLOTS_PER_DAY)
    return block * SERIES_OCCURRENCES * SLOTS_PER_DAY + within


def series_count(pool_size: int) -> int:
    """How many bench series the pool's slots hold."""
    return pool_size // (SERIES_OCCURRENCES * SLOTS_PER_DAY) * SLOTS_PER_DAY


async def set_capacity(url: str, first: int, count: int, capacity: int) -> None:
    """Give the pool slots in [first, first+count) `capacity` seats (their
    appointments are gone: reset() first)."""
    conn = await connect(url)
    try:
        await conn.execute(
            "UPDATE time_slots SET capacity = $2 WHERE id = ANY($1::uuid[])",
            [pool_uuid(POOL_SLOT, k) for k in range(first, first + count)],
            capacity,
        )
    finally:
        await conn.close()


async def slot_states(url: str, first: int, count: int) -> dict[str, int]:
    """How many live appointments each pool slot in [first, first+count) has."""
    conn = await connect(url)
    try:
        rows = await conn.fetch(
            "SELECT time_slot_id::text AS id, count(*) AS n FROM appointments"
            " WHERE status <> 'CANCELLED' AND time_slot_id = ANY($1::uuid[])"
            " GROUP BY time_slot_id",
            [pool_uuid(POOL_SLOT, k) for k in range(first, first + count)],
        )
    finally:
        await conn.close()
    return {r["id"]: int(r["n"]) for r in rows}


async def backend_names(url: str) -> dict[int, str]:
    """application_name of every backend, by pid."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pid, application_name FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )
    finally:
        await conn.close()
    return {int(r["pid"]): str(r["application_name"] or "") for r in rows}


async def delete_webhook_endpoints(url: str) -> None:
    """Forget every webhook endpoint (the webhooks scenario's, between runs)."""
    conn = await connect(url)
    try:
        # Read committed: the server's dispatcher may still be updating an
        # endpoint's row, which would fail this DELETE (40001) at
        # repeatable read instead of waiting for it.
        await conn.execute("SET default_transaction_isolation = 'read committed'")
        await conn.execute("DELETE FROM webhook_endpoints")
    finally:
        await conn.close()
