"""Server processes the harness starts, and what /proc says about them.

CPU time is read from /proc/<pid>/stat (utime + stime, all threads). For
PostgreSQL it is the postmaster plus every child (backends, walwriter,
checkpointer, ...), plus cutime + cstime of the postmaster, which is where
the time of children that exited (closed connections) ends up.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LISTENING = re.compile(r"listening on (\S+):(\d+)")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after "pid (comm)"; comm may contain spaces or parentheses.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of `pid` (and of its waited-for children)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14-17.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def child_pids(ppid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == ppid:
            out.append(int(entry.name))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """A process and all its descendants (e.g. `serve --workers N`), plus
    the children it has already waited for."""
    total = cpu_seconds(pid, children=True)
    for child in child_pids(pid):
        total += tree_cpu_seconds(child)
    return total


def postgres_cpu_seconds(postmaster: int | None) -> float | None:
    if postmaster is None:
        return None
    total = cpu_seconds(postmaster, children=True)
    for pid in child_pids(postmaster):
        total += cpu_seconds(pid)
    return total


def vm_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def postgres_title(pid: int) -> str:
    """What a postgres process is, from its title ("postgres: walwriter")."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    title = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    if not title.startswith("postgres:"):
        return "postmaster"
    rest = title.removeprefix("postgres:").strip()
    for kind in (
        "checkpointer",
        "background writer",
        "walwriter",
        "autovacuum",
        "io worker",
        "logical replication",
        "walsummarizer",
    ):
        if rest.startswith(kind):
            return kind
    return "backend"


class CpuMeter:
    """CPU seconds of some processes between start() and stop().

    For PostgreSQL it also keeps each process's share, labelled by process
    kind or (for backends) by `labels`, a callback mapping backend pids to
    application names, called at stop() while the backends still exist."""

    def __init__(
        self,
        server_pids: list[int],
        postmaster: int | None,
        client_pids: list[int],
        labels: Callable[[], dict[int, str]] | None = None,
    ):
        self.server_pids = server_pids
        self.postmaster = postmaster
        self.client_pids = client_pids
        self.labels = labels
        self._before: dict[str, float | None] = {}
        self._pg_before: dict[int, float] = {}
        self._wall = 0.0

    def _read(self) -> dict[str, float | None]:
        return {
            "server": sum(tree_cpu_seconds(p) for p in self.server_pids)
            if self.server_pids
            else None,
            "postgres": postgres_cpu_seconds(self.postmaster),
            "clients": sum(cpu_seconds(p) for p in self.client_pids),
        }

    def _read_pg(self) -> dict[int, float]:
        if self.postmaster is None:
            return {}
        out = {pid: cpu_seconds(pid) for pid in child_pids(self.postmaster)}
        # The postmaster itself, plus children that exited (their time moves here).
        out[self.postmaster] = cpu_seconds(self.postmaster, children=True)
        return out

    def start(self) -> None:
        self._pg_before = self._read_pg()
        self._before = self._read()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, float | None]:
        after = self._read()
        pg_after = self._read_pg()
        out: dict[str, float | None] = {}
        for key, value in after.items():
            before = self._before.get(key)
            out[key] = None if value is None or before is None else value - before
        out["wall"] = time.monotonic() - self._wall
        self.postgres_by = self._breakdown(pg_after)
        return out

    def _breakdown(self, pg_after: dict[int, float]) -> dict[str, float]:
        names: dict[int, str] = {}
        if self.labels is not None:
            try:
                names = self.labels()
            except Exception:  # noqa: BLE001 - the breakdown is a nicety
                names = {}
        by: dict[str, float] = {}
        for pid, value in pg_after.items():
            delta = value - self._pg_before.get(pid, 0.0)
            if delta <= 0:
                continue
            if pid == self.postmaster:
                label = "postmaster + exited backends"
            else:
                label = postgres_title(pid)
                if label == "backend":
                    label = f"backend: {names.get(pid) or 'other'}"
            by[label] = by.get(label, 0.0) + delta
        return by

    postgres_by: dict[str, float] = {}


class ServerProcess:
    """A server started as `python -m MODULE ...`, its output in a log file;
    ready once it prints 'listening on HOST:PORT'."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: str = "/"
    ):
        self.cwd = cwd
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @classmethod
    def booking(
        cls, name: str, database_url: str, log_path: Path, extra_env: dict[str, str]
    ) -> ServerProcess:
        env = dict(os.environ)
        env.update(
            {
                "DATABASE_URL": database_url,
                "BOOKING_MIGRATE_ON_START": "false",
                "BOOKING_GRACE_SECONDS": "2",
                # 1,000 idle streams must fit (the default cap is 1,000).
                "BOOKING_MAX_STREAMS": "2000",
            }
        )
        env.update(extra_env)
        # The production server plus the bench-only floor RPC (bench.floor_server).
        argv = [
            sys.executable,
            "-m",
            "bench.floor_server",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        return cls(name, argv, env, log_path)

    @classmethod
    def previous(
        cls, tree: Path, database_url: str, log_path: Path, extra_env: dict[str, str]
    ) -> ServerProcess:
        """The previous release's `service.cli serve`, from its source tree
        (service, storage, gen; bench.harness extracts it), with this
        environment's packages."""
        server = cls.booking("server-previous", database_url, log_path, extra_env)
        server.env["PYTHONPATH"] = f"{tree}:{tree / 'gen'}"
        argv = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
        return cls(server.name, argv, server.env, log_path, cwd=str(tree))

    @classmethod
    def echo(cls, log_path: Path) -> ServerProcess:
        argv = [sys.executable, "-m", "bench.echo_server", "--port", "0"]
        return cls("echo", argv, dict(os.environ), log_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                chunk = fh.read().decode(errors="replace")
            match = _LISTENING.search(chunk)
            if match:
                self.port = int(match.group(2))
                return self.port
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_lines_matching(self, needle: str) -> int:
        try:
            with self.log_path.open(errors="replace") as fh:
                return sum(1 for line in fh if needle in line)
        except OSError:
            return 0
