"""The system under test: one durable PostgreSQL and N server replicas,
all child processes of the chaos run, plus the means to hurt them.

The database and the replicas are started the way the benchmark starts
them (bench.db.prepare, bench.procs.ServerProcess); only what a fault needs
is added here: the PostgreSQL process ids, pg_ctl restarts, and replicas on
fixed loopback ports so a restarted replica is found where clients left it.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import db as bench_db
from bench.procs import ServerProcess, child_pids
from storage import embedded

# Processes this run has SIGSTOPped and not yet resumed. atexit resumes them
# whatever happens, so an interrupted run never leaves a frozen database.
_STOPPED: set[int] = set()


def _resume_all() -> None:
    for pid in list(_STOPPED):
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass
        _STOPPED.discard(pid)


atexit.register(_resume_all)


@dataclass
class ReplicaSettings:
    """Server settings for every replica (environment variables)."""

    hold_ttl_seconds: float = 20.0
    sweep_interval_seconds: float = 1.0
    heartbeat_seconds: float = 0.5
    pool_max_size: int = 10
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {
            "BOOKING_HOLD_TTL_SECONDS": str(self.hold_ttl_seconds),
            "BOOKING_SWEEP_INTERVAL_SECONDS": str(self.sweep_interval_seconds),
            "BOOKING_HEARTBEAT_SECONDS": str(self.heartbeat_seconds),
            "BOOKING_POOL_MAX_SIZE": str(self.pool_max_size),
            "BOOKING_TOKEN_TTL_SECONDS": str(7 * 24 * 3600),
            "BOOKING_GRACE_SECONDS": "2",
            "BOOKING_LOG_LEVEL": "INFO",
            **self.extra_env,
        }


def _fast_shutdown(postmaster: int, timeout: float = 60.0) -> None:
    """SIGINT is PostgreSQL's fast shutdown; wait for the postmaster to go."""
    try:
        os.kill(postmaster, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(postmaster, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


class Replica(ServerProcess):
    """`booking-service serve` on a port chosen once and kept across
    restarts; stdout and stderr go to its log file."""

    @classmethod
    def create(
        cls,
        index: int,
        database_url: str,
        log_path: Path,
        settings: ReplicaSettings,
        read_url: str | None = None,
    ) -> Replica:
        port = embedded._free_port()
        env = dict(os.environ)
        env.update(settings.env())
        env["DATABASE_URL"] = database_url
        if read_url:
            # Reads (and event streams) from the standbys (docs/reads.md).
            env["BOOKING_READ_DATABASE_URL"] = read_url
        # Only the first replica migrates, as in a rolling deployment.
        env["BOOKING_MIGRATE_ON_START"] = "true" if index == 0 else "false"
        argv = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        replica = cls(f"replica-{index}", argv, env, log_path)
        replica.port = port
        replica.index = index
        return replica

    index: int = 0
    kills: int = 0

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye to clients or the database."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.kills += 1


class Cluster:
    """PostgreSQL (durable: fsync and synchronous_commit on, so crash
    faults mean something) plus the replicas."""

    def __init__(self, work_dir: Path, replicas: int, settings: ReplicaSettings) -> None:
        self.work_dir = work_dir
        self.n_replicas = replicas
        self.settings = settings
        self.database: bench_db.BenchDatabase | None = None
        self.replicas: list[Replica] = []
        self.database_name = ""

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.database = bench_db.prepare(
            database_url=None, pg_dir=self.work_dir / "pg", durable=True
        )
        self.database_name = self.database.name
        for i in range(self.n_replicas):
            replica = Replica.create(
                i, self.url, self.work_dir / "logs" / f"replica-{i}.log", self.settings
            )
            self.replicas.append(replica)
            replica.start()

    def close(self, *, keep_database: bool = False) -> None:
        """Stop everything; drop the scratch database unless it is to be
        kept for a post-mortem (then PostgreSQL is only stopped)."""
        _resume_all()
        for replica in self.replicas:
            try:
                replica.stop()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                replica.kill()
        if self.database is not None:
            postmaster = self.postmaster_pid()
            try:
                if keep_database:
                    self.pg.stop()
                else:
                    self.database.close()
            except Exception:  # noqa: BLE001 - pg_ctl failed: stop it by signal instead
                if postmaster is not None:
                    _fast_shutdown(postmaster)
            self.database = None

    # -- facts ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.database is not None
        return self.database.url

    @property
    def admin_url(self) -> str:
        assert self.database is not None
        return self.database.admin_url

    @property
    def pg(self) -> embedded.EmbeddedPostgres:
        assert self.database is not None and self.database.embedded is not None
        return self.database.embedded

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.replicas]

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.pg.pgdata / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return None

    def postgres_pids(self) -> list[int]:
        """The postmaster and its children: only processes this run started."""
        postmaster = self.postmaster_pid()
        if postmaster is None:
            return []
        return [postmaster, *child_pids(postmaster)]

    def log_paths(self) -> list[Path]:
        return [r.log_path for r in self.replicas]

    # -- faults -------------------------------------------------------------------

    def pg_restart(self, mode: str) -> None:
        """`pg_ctl restart -m fast|immediate`; returns once it accepts connections.
        The restart reuses the options recorded in postmaster.opts (same port)."""
        embedded.pg_ctl(
            self.pg.pgdata,
            "-l",
            str(self.pg.pgdata / "server.log"),
            *("-m", mode, "-w", "-t", "120", "restart"),
            timeout=180,
        )

    def pg_freeze(self, seconds: float) -> int:
        """SIGSTOP every PostgreSQL process for `seconds`, then SIGCONT.
        Returns how many processes were frozen."""
        pids = self.postgres_pids()
        try:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGSTOP)
                    _STOPPED.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(seconds)
        finally:
            # Resume the postmaster last so no child is woken into a frozen parent.
            for pid in sorted(_STOPPED, key=lambda p: p == pids[0] if pids else False):
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
                _STOPPED.discard(pid)
        return len(pids)

    def restart_replica(self, replica: Replica) -> None:
        replica.start(timeout=120)
