"""Schema migrations: plain SQL files in migrations/, applied by yoyo."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from yoyo import get_backend, read_migrations

from storage import hosts

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


def apply(dsn: str) -> list[str]:
    """Apply every pending migration; returns the ids applied."""
    migrations = read_migrations(str(migrations_dir()))
    with _backend(dsn) as backend, backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    ids = [m.id for m in pending]
    if ids:
        log.info("applied migrations: %s", ", ".join(ids))
    return ids


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


def applied(dsn: str) -> list[str]:
    migrations = read_migrations(str(migrations_dir()))
    with _backend(dsn) as backend:
        return [m.id for m in migrations if backend.is_applied(m)]
