"""storage.hosts on a connection the server dropped while it was being made."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import uvloop

from storage import hosts

pytestmark = pytest.mark.integration


def test_keepalive_on_a_connection_closed_under_the_connect_is_no_error(
    pg_admin_url: str,
) -> None:
    """The server (a node being killed or demoted) can close a session
    between the host scan and the keepalive settings. Under uvloop (as the
    service runs) the closed transport's socket has file descriptor -1, and
    setsockopt raised ValueError, which reached a client as INTERNAL (seen in
    a cluster chaos run). The connection is left for the pool's first
    statement on it to find closed (UNAVAILABLE)."""

    async def main() -> None:
        conn = await asyncpg.connect(pg_admin_url, ssl=False)
        try:
            conn._transport.abort()  # noqa: SLF001 - the server went away
            await asyncio.sleep(0.05)
            hosts._set_keepalive(conn)  # noqa: SLF001
            assert conn.is_closed()
        finally:
            conn.terminate()

    uvloop.run(main())
