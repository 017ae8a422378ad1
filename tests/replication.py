"""A primary with streaming standbys, from the embedded PostgreSQL, for tests.

:class:`ReplicatedCluster` starts a primary and N standbys made with
``pg_basebackup`` on loopback ports, and gives a test the faults a cluster
has: a standby paused with SIGSTOP (its walreceiver stops acknowledging, so
synchronous commits wait), a primary killed outright, a standby promoted
with ``pg_ctl promote``, replay held back with ``recovery_min_apply_delay``,
and the set of synchronous standbys changed while running. Every server
runs as the embedded server's user with its own data directory under one
temporary directory; :meth:`ReplicatedCluster.close` kills what is left and
removes it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg

from storage import basebackup, embedded

DATABASE = "booking"

# fsync off keeps the tests cheap; it changes nothing a replication test
# looks at (what a standby has is what it was sent and acknowledged).
# Standbys report every second, idle or not, as in the shipped Patroni
# configuration: a commit needs a synchronous standby's recent reply (the
# standby lease, storage/sql/durability.sql).
NODE_SETTINGS = {
    "fsync": "off",
    "wal_sender_timeout": "0",
    "wal_receiver_timeout": "0",
    "wal_receiver_status_interval": "1s",
}


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass
class Node:
    """One PostgreSQL server of the cluster."""

    name: str
    pg: embedded.EmbeddedPostgres
    paused: bool = False
    killed: bool = False

    def url(self, database: str = DATABASE) -> str:
        return self.pg.url(database)

    @property
    def postmaster_pid(self) -> int:
        return int((self.pg.pgdata / "postmaster.pid").read_text().splitlines()[0])

    def processes(self) -> list[int]:
        """The postmaster and every process it started."""
        pid = self.postmaster_pid
        return [pid, *_children(pid)]

    def _signal_all(self, sig: signal.Signals) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pause(self) -> None:
        """SIGSTOP the whole server: it neither receives nor acknowledges WAL."""
        self._signal_all(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL the server (postmaster and backends): the machine is gone."""
        pids = self.processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.killed = True
        for pid in pids:
            _wait_gone(pid)

    def drop_unreceived_wal(self) -> None:
        """SIGKILL the paused server's walreceiver. WAL the primary sent
        while this server was stopped waits in its socket's receive buffer;
        resumed, it would read it. Killed, the buffer goes with the socket,
        as it does when a machine or a network link dies. (The postmaster
        treats the death as a crash and restarts recovery from its own WAL.)"""
        assert self.paused, "only a paused server has unreceived WAL to drop"
        for pid in self.processes():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"walreceiver" in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid)

    def promote(self) -> None:
        embedded.pg_ctl(self.pg.pgdata, "promote", "-w", "-t", "60", timeout=90)

    def stop(self) -> None:
        if self.killed:
            return
        if self.paused:
            self.resume()
        with contextlib.suppress(embedded.EmbeddedPostgresError, OSError):
            embedded.pg_ctl(self.pg.pgdata, "-m", "immediate", "-w", "stop", timeout=60)
        self.killed = True

    async def execute(self, sql: str, *args: object, database: str = DATABASE) -> str:
        conn = await asyncpg.connect(self.url(database), ssl=False)
        try:
            return str(await conn.execute(sql, *args))
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: object, database: str = DATABASE) -> object:
        conn = await asyncpg.connect(self.url(database), ssl=False)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()


def _wait_gone(pid: int, within: float = 10.0) -> None:
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie child of pg_ctl's shell is reaped by init; /proc shows it.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return
        except (OSError, IndexError):
            return
        time.sleep(0.01)


@dataclass
class ReplicatedCluster:
    """A primary and its standbys (``standby1``, ``standby2``, …)."""

    base_dir: Path
    primary: Node
    standbys: list[Node] = field(default_factory=list)

    @classmethod
    async def start(
        cls,
        standbys: int = 1,
        *,
        synchronous: bool = True,
        settings: Mapping[str, str] | None = None,
        migrate: bool = True,
    ) -> ReplicatedCluster:
        """A primary with database ``booking`` (migrated unless told not to)
        and `standbys` streaming standbys, all caught up. With
        ``synchronous``, ``synchronous_standby_names`` names every standby
        (``ANY 1 (...)``: one acknowledgement is enough)."""
        base = Path(tempfile.mkdtemp(prefix="booking-repl-"))
        node_settings = {**NODE_SETTINGS, **(settings or {})}
        cluster: ReplicatedCluster | None = None
        try:
            if migrate:
                # A copy of a stopped primary migrated once per process:
                # initdb and the migration chain took most of a cluster's
                # start-up, once per test.
                _copy_tree(await _migrated_primary(), base / "primary")
            pg = embedded.start(base / "primary", max_connections=100, settings=node_settings)
            cluster = cls(base, Node("primary", pg))
            if not migrate:
                await cluster.primary.execute(f"CREATE DATABASE {DATABASE}", database="postgres")
            for number in range(1, standbys + 1):
                cluster.standbys.append(cluster._make_standby(f"standby{number}", node_settings))
            if synchronous and standbys:
                names = ", ".join(s.name for s in cluster.standbys)
                await cluster.set_synchronous(f"ANY 1 ({names})")
            await cluster.wait_streaming()
            return cluster
        except BaseException:
            if cluster is not None:
                cluster.close()
            else:
                shutil.rmtree(base, ignore_errors=True)
            raise

    def _make_standby(self, name: str, settings: Mapping[str, str]) -> Node:
        pg = basebackup.make_standby(
            self.primary.pg, self.base_dir / name, name, max_connections=100, settings=settings
        )
        return Node(name, pg)

    def standby(self, name: str) -> Node:
        return next(s for s in self.standbys if s.name == name)

    async def set_synchronous(self, names: str, node: Node | None = None) -> None:
        """Set ``synchronous_standby_names`` (on the primary by default) and
        reload; '' makes replication asynchronous."""
        target = node or self.primary
        await target.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        await target.execute("SELECT pg_reload_conf()")
        # A reload is asynchronous: wait until a new session sees it.
        while await target.fetchval("SHOW synchronous_standby_names") != names:
            await _sleep()

    async def set_apply_delay(self, standby: Node, delay: str) -> None:
        """Hold back replay on `standby` by ``recovery_min_apply_delay``
        (e.g. '2s'; '0' to stop); WAL is still received and flushed."""
        await standby.execute(f"ALTER SYSTEM SET recovery_min_apply_delay = '{delay}'")
        await standby.execute("SELECT pg_reload_conf()")
        if delay.strip("0smh ") == "":
            return
        # pg_reload_conf only signals: the startup process takes the delay
        # when it next handles the signal, and a commit arriving before that
        # is replayed at once. The delay is in effect once a commit made
        # now is received but not replayed (it then waits its delay, and
        # every later commit behind it).
        while True:
            await self.primary.execute("SELECT pg_current_xact_id()")  # a commit
            lsn = await self.primary.fetchval("SELECT pg_current_wal_insert_lsn()::text")
            while not await standby.fetchval(
                "SELECT pg_last_wal_receive_lsn() >= $1::text::pg_lsn", lsn
            ):
                await _sleep()
            if not await standby.fetchval(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn
            ):
                return

    async def wait_streaming(self) -> None:
        """Until every live standby streams from the primary."""
        wanted = {s.name for s in self.standbys if not s.killed}
        while True:
            names = await self.primary.fetchval(
                "SELECT coalesce(array_agg(application_name::text), '{}') FROM pg_stat_replication"
                " WHERE state = 'streaming'"
            )
            if wanted <= set(names):  # type: ignore[call-overload]
                return
            await _sleep()

    async def wait_replayed(self, standby: Node, lsn: str) -> None:
        """Until `standby` has replayed WAL up to `lsn`."""
        while not await standby.fetchval(
            "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn
        ):
            await _sleep()

    def fail_over(self, to: Node) -> None:
        """The primary's machine dies and `to` is promoted: what `to` has
        not received is lost (a paused `to` loses what it had not read).
        The other standbys are left as they are."""
        self.primary.kill()
        if to.paused:
            to.drop_unreceived_wal()
            to.resume()
        to.promote()
        old = self.primary
        self.standbys.remove(to)
        self.standbys.append(old)
        self.primary = to

    def close(self) -> None:
        for node in [self.primary, *self.standbys]:
            node.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> ReplicatedCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_MIGRATED: Path | None = None


async def _migrated_primary() -> Path:
    """The data directory (server stopped) of a primary whose database
    ``booking`` is migrated, made on first use in this process and removed
    at its exit. Copies of it share its system identifier, which no test
    compares across clusters (a token of another cluster is made up)."""
    global _MIGRATED
    if _MIGRATED is None:
        from storage import migrate as migrations

        base = Path(tempfile.mkdtemp(prefix="booking-repl-template-"))
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        pg = embedded.start(base / "primary", max_connections=100, settings=NODE_SETTINGS)
        try:
            node = Node("primary", pg)
            await node.execute(f"CREATE DATABASE {DATABASE}", database="postgres")
            migrations.apply(node.url())
        finally:
            pg.stop()
        _MIGRATED = base / "primary"
    return _MIGRATED


def _copy_tree(source: Path, target: Path) -> None:
    """`source` copied to `target`, owners and modes kept (the data
    directory belongs to the server's user)."""
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


async def _sleep() -> None:
    await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def replicated_cluster(standbys: int = 1, **kwargs: Any) -> AsyncIterator[ReplicatedCluster]:
    cluster = await ReplicatedCluster.start(standbys, **kwargs)
    try:
        yield cluster
    finally:
        cluster.close()
