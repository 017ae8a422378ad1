"""Test fixtures: one real PostgreSQL per session, a fresh database per test.

The schema is migrated once into a template database; every test gets its
own copy (CREATE DATABASE ... TEMPLATE ...), which takes milliseconds.
Set TEST_DATABASE_URL to use an existing server instead of the embedded one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.server import BookingServer
from storage import embedded, migrate
from tests import ordering
from tests.support import Api, running_server

# The image test builds and runs the container (minutes, root, podman): run by
# scripts/image-test only, which sets BOOKING_IMAGE_TEST=1 (docs/operations.md).
collect_ignore = [] if os.environ.get("BOOKING_IMAGE_TEST") == "1" else ["container"]

TEMPLATE = "booking_test_template"
_counter = itertools.count()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    data_dir = Path(tempfile.mkdtemp(prefix="booking-test-pg-"))
    server = embedded.start(data_dir, unsafe_fast=True, max_connections=300)
    try:
        yield server.url("postgres")
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
async def template_url(pg_admin_url: str) -> str:
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    url = _with_database(pg_admin_url, TEMPLATE)
    migrate.apply(url)
    return url


@asynccontextmanager
async def scratch_database(admin_url: str, template: str) -> AsyncIterator[str]:
    """A new database copied from `template` for the block; dropped after."""
    name = f"booking_test_{os.getpid()}_{next(_counter)}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await conn.close()
    try:
        yield _with_database(admin_url, name)
    finally:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


@pytest.fixture
async def database_url(pg_admin_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh copy of the migrated template for each test."""
    async with scratch_database(pg_admin_url, TEMPLATE) as url:
        yield url


@pytest.fixture
async def empty_database_url(pg_admin_url: str) -> AsyncIterator[str]:
    """A database with no schema at all."""
    async with scratch_database(pg_admin_url, "template0") as url:
        yield url


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[BookingServer]:
    """A started server on this test's database (tests.support.running_server
    starts one with overrides)."""
    async with running_server(database_url) as srv:
        yield srv


@pytest.fixture
async def api(server: BookingServer) -> AsyncIterator[Api]:
    async with Api.connect(server) as client:
        yield client


def pytest_configure(config: pytest.Config) -> None:
    # xdist orders files by their number of tests unless told not to; the
    # order below (tests/ordering.py) is by their recorded cost instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    ordering.slowest_files_first(items)
