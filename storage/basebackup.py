"""A streaming standby of an embedded PostgreSQL, made with pg_basebackup
on loopback. Shared by the replication tests (tests/replication.py) and the
bench's synchronous-standby scenario (tools/bench)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from storage import embedded


def make_standby(
    primary: embedded.EmbeddedPostgres,
    data_dir: Path,
    name: str,
    *,
    max_connections: int = 100,
    settings: Mapping[str, str] | None = None,
    slot: str | None = None,
) -> embedded.EmbeddedPostgres:
    """Copy `primary` into `data_dir` (which must not hold a cluster yet)
    and start it as a hot standby streaming from it, with
    application_name `name` (what synchronous_standby_names refers to).
    `max_connections` must be at least the primary's (a hot standby
    refuses to start otherwise). With `slot`, a physical replication slot
    of that name is created on the primary and used, so the primary keeps
    the WAL a stopped standby has not received (drop it when done)."""
    data_dir.mkdir(parents=True)
    pgdata = data_dir / "pgdata"
    password = primary.password
    (data_dir / embedded.PASSWORD_FILE).write_text(password)
    (data_dir / embedded.PASSWORD_FILE).chmod(0o600)
    # Owned by the server's user: pg_basebackup runs as it.
    embedded._chown_for_server(data_dir)
    embedded._make_traversable(data_dir)
    embedded._run(
        [
            "env",
            f"PGPASSWORD={password}",
            str(embedded.bin_dir() / "pg_basebackup"),
            "-D",
            str(pgdata),
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            embedded.SUPERUSER,
            "-X",
            "stream",
            "--checkpoint=fast",
            "-R",
            *(["-C", "-S", slot] if slot else []),
        ]
    )
    conninfo = (
        f"host=127.0.0.1 port={primary.port} user={embedded.SUPERUSER}"
        f" password={password} application_name={name}"
    )
    with (pgdata / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"primary_conninfo = '{conninfo}'\n")
    return embedded.start(data_dir, max_connections=max_connections, settings=settings)
