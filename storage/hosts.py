"""Finding the writable primary among the hosts of a DATABASE_URL.

A DATABASE_URL may name several hosts, libpq style
(``postgresql://u:p@h1:5432,h2:5432,h3:5432/db?target_session_attrs=read-write``),
or one front (HAProxy) that forwards to whichever node is the primary. The
service connects through :func:`connect` rather than asyncpg's own host
loop, which catches only OSError under one overall timeout: a host answering
57P03 (starting up) can end its scan, and a black-holed first host can use
up the whole timeout. Here every host gets its own timeout, any failure of
one host moves on to the next, and with ``target_session_attrs`` of
``read-write`` or ``primary`` every new session is checked: a standby, a
read-only session, or (when two nodes both claim to be primary, as a node
resuming after it was demoted in its absence does for a moment) the one on
the older timeline is refused.

yoyo and psycopg (the migrations) take one host: :func:`primary_url` finds
the primary the same way and names only it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

# libpq's connect_timeout is per host; so is ours. Without it in the URL a
# host gets this long to accept a session and answer one query.
DEFAULT_PER_HOST_SECONDS = 2.0
# What a host whose last try timed out still gets, once another host has
# offered a writable session.
SUSPECT_GRACE_SECONDS = 0.25
# Query parameters this module consumes; asyncpg is given the rest.
_OURS = ("target_session_attrs", "connect_timeout")
_CHECKED = ("read-write", "primary")

# Client-side TCP settings: a peer that vanished (a machine, not a process)
# is noticed in seconds instead of the kernel's two hours, and unacknowledged
# data fails the socket after TCP_USER_TIMEOUT. (A SIGSTOPped PostgreSQL on a
# live kernel still acknowledges; the health probe covers that case.)
_KEEPALIVE = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", 4), 5),
    (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", 5), 2),
    (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", 6), 3),
    (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18), 10_000),
)

# One round trip: the session's role, and the timeline of the WAL it writes
# (a standby reports 0). A node promoted later is on a higher timeline.
_ROLE_QUERY = (
    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on',"
    " CASE WHEN pg_is_in_recovery() THEN 0"
    " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END"
)


class NoPrimary(ConnectionError):
    """No host of the URL offered a session of the kind asked for (an
    OSError, so callers treat it as the database being unreachable)."""


@dataclass(frozen=True)
class Host:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Target:
    """A DATABASE_URL taken apart: its hosts and how to choose among them."""

    hosts: tuple[Host, ...]
    session_attrs: str
    per_host_seconds: float | None
    _scheme: str
    _userinfo: str
    _path: str
    _query: tuple[tuple[str, str], ...]

    def url_for(self, host: Host) -> str:
        """The URL naming `host` only, without the parameters consumed here."""
        netloc = (self._userinfo + "@" if self._userinfo else "") + str(host)
        query = urlencode([(k, v) for k, v in self._query if k not in _OURS])
        return urlunsplit((self._scheme, netloc, self._path, query, ""))

    @property
    def checked(self) -> bool:
        return self.session_attrs in _CHECKED


def parse(dsn: str) -> Target:
    """Split a (possibly multi-host) postgresql:// URL."""
    parts = urlsplit(dsn)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    query = tuple(parse_qsl(parts.query, keep_blank_values=True))
    params = dict(query)
    default_port = int(params.get("port", "5432") or 5432)
    hosts: list[Host] = []
    for item in hostlist.split(",") if hostlist else [""]:
        if item.startswith("["):  # [v6]:port
            name, _, rest = item[1:].partition("]")
            port = rest.lstrip(":")
        else:
            name, _, port = item.partition(":")
        if not port:
            hosts.append(Host(name or params.get("host", "localhost"), default_port))
            continue
        if not port.isdigit():
            raise ValueError(f"invalid port {port!r} in the database URL")
        hosts.append(Host(name or "localhost", int(port)))
    timeout = params.get("connect_timeout")
    return Target(
        hosts=tuple(hosts),
        session_attrs=params.get("target_session_attrs", "any"),
        per_host_seconds=float(timeout) if timeout else None,
        _scheme=parts.scheme,
        _userinfo=userinfo,
        _path=parts.path,
        _query=query,
    )


def _set_keepalive(conn: asyncpg.Connection) -> None:
    sock = conn._transport.get_extra_info("socket") if conn._transport else None  # noqa: SLF001
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, option, value in _KEEPALIVE:
        # ValueError: the server closed the session meanwhile (uvloop's
        # socket of a closed transport has file descriptor -1). The pool's
        # first statement on it finds it closed: UNAVAILABLE, not INTERNAL.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(level, option, value)


@dataclass
class _Answer:
    host: Host
    conn: asyncpg.Connection | None = None
    writable: bool = False
    timeline: int = 0
    problem: str = ""


class Finder:
    """Connects to the primary of one DATABASE_URL, remembering which host
    it was so the next connect tries it first (one per Database)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.target = parse(dsn)
        self.current: Host | None = None
        # Hosts whose last try timed out (hung, black-holed): a scan does
        # not wait the full per-host timeout for them once another host has
        # offered a writable session.
        self.suspects: set[Host] = set()

    async def _scan(self, one: Callable[[Host], Awaitable[_Answer]]) -> list[_Answer]:
        """Every host at once. Each host that is not a suspect is waited for
        (up to the per-host timeout): a node on a newer timeline may answer
        later than a demoted one that resumed, and the timelines decide, not
        the race. A suspect gets SUSPECT_GRACE_SECONDS more once a writable
        session is on offer, so a hung node does not make every connect (and
        the call waiting for it) last a whole per-host timeout."""
        tasks = {asyncio.ensure_future(one(h)): h for h in self.target.hosts}
        suspects = {t for t, h in tasks.items() if h in self.suspects}
        try:
            others = [t for t in tasks if t not in suspects]
            if others:
                await asyncio.wait(others)
            if suspects:
                offered = any(t.result().writable for t in others)
                await asyncio.wait(suspects, timeout=SUSPECT_GRACE_SECONDS if offered else None)
        finally:
            late = [t for t in tasks if not t.done()]
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return [t.result() for t in tasks if not t.cancelled()]

    def forget(self) -> None:
        """The remembered primary stopped answering: scan every host next time."""
        self.current = None

    async def connect(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        """asyncpg.connect's signature (the pool's ``connect=``); the DSN is
        this Finder's, a positional DSN is ignored."""
        from storage.database import tls_options  # the one TLS default

        del args
        overall = float(kwargs.pop("timeout", None) or 60.0)
        per_host = min(self.target.per_host_seconds or DEFAULT_PER_HOST_SECONDS, overall)
        target = self.target
        if not target.checked and len(target.hosts) == 1:
            url = target.url_for(target.hosts[0])
            conn = await asyncpg.connect(url, timeout=overall, **{**tls_options(url), **kwargs})
            _set_keepalive(conn)
            return conn

        async def one(host: Host) -> _Answer:
            answer = _Answer(host)
            url = target.url_for(host)
            try:
                async with asyncio.timeout(per_host):
                    conn = await asyncpg.connect(
                        url, timeout=per_host, **{**tls_options(url), **kwargs}
                    )
                    try:
                        row = await conn.fetchrow(_ROLE_QUERY)
                    except BaseException:
                        conn.terminate()
                        raise
            except Exception as exc:  # noqa: BLE001 - any failure: try the next host
                answer.problem = f"{type(exc).__name__}: {exc}".strip()
                if isinstance(exc, TimeoutError):
                    self.suspects.add(host)
                return answer
            self.suspects.discard(host)
            in_recovery, read_only, timeline = row[0], row[1], row[2]
            answer.conn = conn
            answer.timeline = int(timeline)
            if target.session_attrs == "primary":
                answer.writable = not in_recovery
            elif target.checked:
                answer.writable = not in_recovery and not read_only
            else:
                answer.writable = True
            if not answer.writable:
                answer.problem = "standby" if in_recovery else "read-only"
            return answer

        async with asyncio.timeout(overall):
            remembered = self.current
            if remembered is not None:
                answer = await one(remembered)
                if answer.writable and answer.conn is not None:
                    _set_keepalive(answer.conn)
                    return answer.conn
                if answer.conn is not None:
                    answer.conn.terminate()
                if self.current == remembered:
                    self.current = None
                log.info(
                    "database host %s: %s; looking for the primary", remembered, answer.problem
                )
            answers = await self._scan(one)
        best: _Answer | None = None
        for answer in answers:
            if answer.writable and (best is None or answer.timeline > best.timeline):
                best = answer
        for answer in answers:
            if answer is not best and answer.conn is not None:
                answer.conn.terminate()
        if best is None or best.conn is None:
            raise NoPrimary(
                "no primary among the database hosts: "
                + "; ".join(f"{a.host}: {a.problem or 'refused'}" for a in answers)
            )
        if best.host != self.current:
            if len(target.hosts) > 1:
                log.info("database primary is %s (timeline %d)", best.host, best.timeline)
            self.current = best.host
        _set_keepalive(best.conn)
        return best.conn


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """One session on the primary of `dsn` (see :class:`Finder`)."""
    return await Finder(dsn).connect(**kwargs)


async def _primary_url(dsn: str, within: float) -> str:
    finder = Finder(dsn)
    conn = await finder.connect(timeout=within)
    await conn.close()
    assert finder.current is not None or len(finder.target.hosts) == 1
    return finder.target.url_for(finder.current or finder.target.hosts[0])


def primary_url(dsn: str, timeout: float = 30.0) -> str:
    """`dsn` naming only its primary host (for yoyo and psycopg, which take
    one). A single-host URL without target_session_attrs is returned as is.
    Blocking: it runs its own event loop (call it from a thread)."""
    target = parse(dsn)
    if len(target.hosts) == 1 and not target.checked:
        return dsn
    return asyncio.run(_primary_url(dsn, timeout))
