"""Which replica of the service read what on which standby (cluster mode
with standby reads): evidence that standby readers and consumers are
really served by standbys, not by the primary they fall back to.

Once a second it asks every node that is in recovery for its client
sessions (`pg_stat_activity`: backend pid, client port, last statement and
when it started) and maps each session's client port to the replica
process that owns the socket (/proc: the replica's file descriptors, and
/proc/net/tcp for their local ports). A session whose last statement read
the event log (`appointment_events`) or appointments is counted once per
statement (backend pid, start time). It is a sample, a lower bound: a read
that starts and ends between two looks is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg

from bench.procs import child_pids

SESSIONS_SQL = (
    "SELECT pid, client_port, query, query_start::text AS started FROM pg_stat_activity"
    " WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)
INTERVAL_SECONDS = 1.0
TIMEOUT_SECONDS = 1.0


def classify(query: str) -> str:
    if "appointment_events" in query:
        return "event_log"
    if "FROM appointments" in query:
        return "appointments"
    return ""


def _socket_ports() -> dict[int, int]:
    """Socket inode -> local TCP port, for every TCP socket on the machine."""
    out: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            port = int(fields[1].rsplit(":", 1)[1], 16)
            out[int(fields[9])] = port
    return out


def _inodes(pid: int) -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
    return out


def port_owners(processes: dict[str, int]) -> dict[int, str]:
    """Local TCP port -> the name of the process (or a child of it) owning it."""
    ports = _socket_ports()
    out: dict[int, str] = {}
    for name, pid in processes.items():
        for p in (pid, *child_pids(pid)):
            for inode in _inodes(p):
                if inode in ports:
                    out[ports[inode]] = name
    return out


class StandbyObserver:
    def __init__(self, nodes: dict[str, str], database: str) -> None:
        """`nodes`: node name -> its own URL (one host)."""
        self.nodes = nodes
        self.database = database
        # (replica, node, kind) -> {(backend pid, statement start)}
        self.seen: dict[tuple[str, str, str], set[tuple[int, str]]] = defaultdict(set)
        self.looks = 0
        self._conns: dict[str, Any] = {}

    async def run(self, stop: asyncio.Event, processes: Any) -> None:
        """Until `stop`; `processes()` gives replica name -> pid (replicas
        restart with new pids)."""
        try:
            while not stop.is_set():
                owners = await asyncio.to_thread(port_owners, processes())
                for name, url in self.nodes.items():
                    await self._look(name, url, owners)
                self.looks += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), INTERVAL_SECONDS)
        finally:
            for conn in self._conns.values():
                conn.terminate()
            self._conns.clear()

    async def _look(self, node: str, url: str, owners: dict[int, str]) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                conn = self._conns.get(node)
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(url, ssl=False)
                    self._conns[node] = conn
                if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                    return
                rows = await conn.fetch(SESSIONS_SQL, self.database)
        except Exception:  # noqa: BLE001 - a node down or frozen: look again later
            conn = self._conns.pop(node, None)
            if conn is not None:
                conn.terminate()
            return
        for r in rows:
            replica = owners.get(r["client_port"])
            kind = classify(r["query"] or "")
            if replica and kind:
                self.seen[(replica, node, kind)].add((r["pid"], r["started"] or ""))

    def summary(self) -> dict[str, dict[str, int]]:
        """replica -> {"event_log on node1": statements seen, ...}"""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for (replica, node, kind), statements in sorted(self.seen.items()):
            out[replica][f"{kind} on {node}"] = len(statements)
        return dict(out)

    def reads_by_replica(self, kind: str) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (replica, _node, k), statements in self.seen.items():
            if k == kind:
                out[replica] += len(statements)
        return dict(out)
