"""Schema migrations: plain SQL files in migrations/, applied by yoyo.

One chain, in order. Most migrations expand (docs/upgrades.md): the previous
release keeps working on the result, so they apply as soon as a replica of
this release starts. A migration whose header says ``-- contract: <what it
drops>`` removes what only the previous release used; it must wait until no
replica of that release is left. So :func:`apply` leaves the contract
migrations at the end of the chain pending unless asked (``contract=True``,
``booking-service migrate apply --contract``). Once a newer release's
migrations follow them, the release they were waiting for is two releases
old, and they apply in order with the rest. A database with nothing applied
yet gets the whole chain: no older release can be running against it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from yoyo import get_backend, read_migrations
from yoyo.migrations import MigrationList

from storage import hosts
from storage.database import RetryPolicy

log = logging.getLogger(__name__)


def migrations_dir() -> Path:
    """migrations/ beside the packages, in a checkout and in an install."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("migrations directory not found")


def _yoyo_url(dsn: str) -> str:
    # yoyo picks its driver from the scheme; psycopg 3 is the one we ship.
    scheme, sep, rest = dsn.partition("://")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    return dsn


@contextmanager
def _backend(dsn: str) -> Iterator[Any]:
    # yoyo parses the URL itself and takes one host: a multi-host URL (or
    # one with target_session_attrs) is narrowed to its current primary.
    backend = get_backend(_yoyo_url(hosts.primary_url(dsn)))
    try:
        yield backend
    finally:
        # Left open, the session would block CREATE DATABASE ... TEMPLATE.
        backend.connection.close()


_CONTRACT = re.compile(r"^\s*--\s*contract\s*:", re.MULTILINE)


def is_contract(migration: Any) -> bool:
    """Whether a migration is a contract step (its header says ``-- contract:``)."""
    return bool(_CONTRACT.search(Path(migration.path).read_text()))


def due_contract(migrations: Any) -> list[str]:
    """The contract migrations at the end of the chain: the ones that wait
    for ``apply(contract=True)``."""
    waiting: list[str] = []
    for m in migrations:
        waiting = [*waiting, m.id] if is_contract(m) else []
    return waiting


# A migration that takes table locks (CREATE TRIGGER: SHARE ROW EXCLUSIVE)
# while the previous release serves can deadlock with a transition that
# holds one of those tables and wants the next; PostgreSQL then aborts one
# of the two. Each migration is one transaction, so an aborted one left
# nothing behind: it is applied again, after a pause, from where the chain
# stopped. The service's transactions retry the same errors
# (storage/database.py).
MIGRATION_RETRY = RetryPolicy(attempts=6, base_delay=0.1, max_delay=2.0)
_TRANSIENT = (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable)


def apply(dsn: str, *, contract: bool = False) -> list[str]:
    """Apply every pending migration, except the trailing contract ones
    unless `contract` (or the database is new); returns the ids applied.
    A migration aborted by a deadlock or a lock timeout is applied again
    (MIGRATION_RETRY)."""
    done: list[str] = []
    attempt = 0
    while True:
        try:
            return done + _apply_once(dsn, contract=contract, done=done)
        except _TRANSIENT as exc:
            attempt += 1
            if attempt >= MIGRATION_RETRY.attempts:
                raise
            log.warning("migration aborted (%s); applying it again", type(exc).__name__)
            time.sleep(MIGRATION_RETRY.delay(attempt))


def _apply_once(dsn: str, *, contract: bool, done: list[str]) -> list[str]:
    migrations = read_migrations(str(migrations_dir()))
    with _backend(dsn) as backend, backend.lock():
        pending = backend.to_apply(migrations)
        fresh = not any(backend.is_applied(m) for m in migrations)
        held = set() if contract or fresh else set(due_contract(migrations))
        chosen = MigrationList([m for m in pending if m.id not in held])
        try:
            backend.apply_migrations(chosen)
        except _TRANSIENT:
            # The ones applied before the aborted one stay applied.
            done.extend(m.id for m in chosen if backend.is_applied(m))
            raise
    ids = [m.id for m in chosen]
    if ids:
        log.info("applied migrations: %s", ", ".join(ids))
    waiting = [m.id for m in pending if m.id in held]
    if waiting:
        log.info(
            "contract migrations pending until no replica of the previous release is"
            " left (then: booking-service migrate apply --contract): %s",
            ", ".join(waiting),
        )
    return ids


def pending_contract(dsn: str) -> list[str]:
    """The contract migrations not applied yet that wait for ``--contract``."""
    migrations = read_migrations(str(migrations_dir()))
    with _backend(dsn) as backend:
        return [
            m.id
            for m in migrations
            if m.id in due_contract(migrations) and not backend.is_applied(m)
        ]


def rollback(dsn: str, count: int = 1) -> list[str]:
    """Roll back the newest `count` applied migrations; returns their ids."""
    migrations = read_migrations(str(migrations_dir()))
    with _backend(dsn) as backend, backend.lock():
        applied = backend.to_rollback(migrations)
        chosen = applied[:count]
        backend.rollback_migrations(chosen)
    ids = [m.id for m in chosen]
    log.info("rolled back migrations: %s", ", ".join(ids) or "none")
    return ids


def status(dsn: str) -> list[tuple[str, bool]]:
    """Every migration in order, and whether it is applied."""
    migrations = read_migrations(str(migrations_dir()))
    with _backend(dsn) as backend:
        return [(m.id, bool(backend.is_applied(m))) for m in migrations]


def contract_ids() -> list[str]:
    """Every contract migration, in order."""
    return [m.id for m in read_migrations(str(migrations_dir())) if is_contract(m)]


def applied(dsn: str) -> list[str]:
    migrations = read_migrations(str(migrations_dir()))
    with _backend(dsn) as backend:
        return [m.id for m in migrations if backend.is_applied(m)]
