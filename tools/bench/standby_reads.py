"""The standby-reads scenario: reads on the primary vs on two standbys, in
one run (docs/performance.md, "Reads from standbys").

``booking-service bench --scenarios standby-reads`` (or
``python -m bench.standby_reads``, the same with that scenario alone).

A primary with two streaming standbys of its own (the embedded PostgreSQL,
``pg_basebackup`` on loopback, made once per run and removed at its end),
a booking server in the bench's process, and a read-heavy mix from
concurrent callers: ListSlots, GetSpecialist, ListAppointmentEvents and
SearchAvailableSlots reads, one CreateSlot write in ten operations. Four phases per repeat:

- ``writes``: writes only (the primary's CPU per write);
- ``primary``: the mix with every read on the primary;
- ``token_writes``: writes only with standby reads on (each write's
  token costs the primary a round trip);
- ``standbys``: the mix with reads on the standbys, no tokens;
- ``tokens``: the same, each caller carrying its writes' tokens
  (``booking_client.Session``: every read waits for a standby that
  replayed the caller's last write).

PostgreSQL's CPU is read from /proc for each node's processes, so the
primary's CPU per read is the phase's primary sessions' CPU less its
writes' share (the CPU per write of the writes-only phase of the same
server); the routing counters of the server
(storage/replicas.py) give the reads served by standbys, the token waits
and the fallbacks to the primary. The server runs in this process (its
counters are read directly), so its CPU and the callers' are one figure.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from bench.procs import child_pids, cpu_seconds, postgres_title
from bench.report import Figure, Goal
from bench.stats import percentile

if TYPE_CHECKING:
    from bench.context import Bench

SCENARIO = "standby-reads"
DATABASE = "booking"
WRITE_SHARE = 0.1
PASSWORD = "bench-standby-reads"
# The slots each phase's specialist starts with (ListSlots pages of 20).
SLOTS = 20
# Goals (docs/performance.md).
OFF_PRIMARY_GOAL = 0.80
LATENCY_LIMIT = 2.0
TOKEN_WAIT_P99_MS = 50.0
FALLBACK_LIMIT = 0.01
# Each server's unmeasured warm-up (at most the run's duration).
WARM_UP_SECONDS = 1.0
# (key, label, server overrides, write share, tokens)
PHASES: tuple[tuple[str, str, bool, float, bool], ...] = (
    ("writes", "CreateSlot only, reads on the primary", True, 1.0, False),
    ("primary", "read-heavy mix, every read on the primary", True, WRITE_SHARE, False),
    ("token_writes", "CreateSlot only, standby reads on (tokens issued)", False, 1.0, False),
    ("standbys", "read-heavy mix, reads on 2 standbys, no tokens", False, WRITE_SHARE, False),
    ("tokens", "read-heavy mix, reads on 2 standbys, callers' tokens", False, WRITE_SHARE, True),
)
EXTRAS = [
    ("token_cost_us", "the token's cost per write on the primary", " us"),
    ("off_primary_pct", "read work off the primary", "%"),
    ("standby_share_pct", "reads on standbys", "%"),
    ("standby_pg_cpu_us", "standby PG CPU per standby read", " us"),
    ("walsender_cpu_us", "primary walsenders per op", " us"),
    ("token_wait_p50_ms", "token wait p50", " ms"),
    ("token_wait_p99_ms", "token wait p99", " ms"),
    ("fallbacks", "fallbacks to the primary", ""),
]


# The client package (booking_client.Session carries the callers' tokens):
# installed, or the source checkout's copy.
CLIENT_SRC = Path(__file__).resolve().parents[2] / "clients" / "python" / "src"


def client_package() -> bool:
    """Whether booking_client can be imported (from the checkout if need be)."""
    try:
        import booking_client  # noqa: F401
    except ImportError:
        if not (CLIENT_SRC / "booking_client").is_dir():
            return False
        sys.path.append(str(CLIENT_SRC))
    return True


# -- the cluster ----------------------------------------------------------------


@dataclass
class Node:
    name: str
    pg: Any  # storage.embedded.EmbeddedPostgres

    def url(self) -> str:
        return str(self.pg.url(DATABASE))

    def postmaster(self) -> int | None:
        try:
            return int((self.pg.pgdata / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far by kind: the sessions' backends (what queries
        cost), the walsenders (streaming to the standbys), and the rest
        (postmaster, walwriter, checkpointer, autovacuum, the startup
        process replaying WAL on a standby, ...)."""
        pid = self.postmaster()
        if pid is None:
            return {}
        # The postmaster's waited-for children: sessions that ended.
        out = {"backend": 0.0, "walsender": 0.0, "other": cpu_seconds(pid, children=True)}
        for child in child_pids(pid):
            out[_kind(child)] += cpu_seconds(child)
        return out


def _kind(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "other"
    title = raw.replace(b"\0", b" ").decode(errors="replace").removeprefix("postgres:").strip()
    if title.startswith("walsender"):
        return "walsender"
    # A session's title: "user database host(port) state".
    return "backend" if postgres_title(pid) == "backend" and "(" in title else "other"


@dataclass
class Cluster:
    base: Path
    primary: Node
    standbys: list[Node] = field(default_factory=list)

    def read_url(self) -> str:
        first = self.standbys[0].pg
        hosts = ",".join(f"127.0.0.1:{s.pg.port}" for s in self.standbys)
        return self.standbys[0].url().replace(f"127.0.0.1:{first.port}", hosts, 1)

    def close(self) -> None:
        for node in [*self.standbys, self.primary]:
            try:
                node.pg.stop()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        shutil.rmtree(self.base, ignore_errors=True)


def make_cluster(durable: bool) -> Cluster:
    """A migrated primary (database ``booking``) and two asynchronous
    streaming standbys. In a short temporary path: a Unix socket's path is
    at most 107 bytes."""
    from storage import basebackup, embedded, migrate

    base = Path(tempfile.mkdtemp(prefix="bsr-"))
    settings = {"wal_receiver_status_interval": "1s"}
    cluster: Cluster | None = None
    try:
        pg = embedded.start(
            base / "primary", max_connections=100, unsafe_fast=not durable, settings=settings
        )
        cluster = Cluster(base, Node("primary", pg))
        asyncio.run(_execute(pg.url("postgres"), f"CREATE DATABASE {DATABASE}"))
        migrate.apply(cluster.primary.url())
        for n in (1, 2):
            name = f"standby{n}"
            cluster.standbys.append(
                Node(
                    name,
                    basebackup.make_standby(
                        pg, base / name, name, max_connections=100, settings=settings
                    ),
                )
            )
        asyncio.run(_wait_streaming(cluster))
        return cluster
    except BaseException:
        if cluster is not None:
            cluster.close()
        else:
            shutil.rmtree(base, ignore_errors=True)
        raise


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, ssl=False)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _wait_streaming(cluster: Cluster) -> None:
    conn = await asyncpg.connect(cluster.primary.url(), ssl=False)
    try:
        until = time.monotonic() + 60
        while time.monotonic() < until:
            n = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
            )
            if n == len(cluster.standbys):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the standbys did not stream within 60 s")
    finally:
        await conn.close()


# -- the load -------------------------------------------------------------------


def _ts(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


@dataclass
class Measured:
    reads: int = 0
    writes: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    read_latency: list[float] = field(default_factory=list)


class Caller:
    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        from booking.v1 import appointment_pb2_grpc, slot_pb2_grpc, specialist_pb2_grpc

        self.appointments = appointment_pb2_grpc.AppointmentServiceStub(channel)
        self.slots = slot_pb2_grpc.SlotServiceStub(channel)
        self.specialists = specialist_pb2_grpc.SpecialistServiceStub(channel)
        self.md = (("authorization", f"Bearer {token}"),)

    async def run(
        self,
        specialist_id: str,
        service_type: str,
        out: Measured,
        until: float,
        write_share: float,
        rng: random.Random,
    ) -> None:
        from booking.v1 import appointment_pb2 as apb
        from booking.v1 import slot_pb2 as spb
        from booking.v1 import specialist_pb2 as sppb

        now = datetime.now(UTC)
        window = (_ts(now), _ts(now + timedelta(days=SLOTS + 2)))
        while time.monotonic() < until:
            try:
                if rng.random() < write_share:
                    start = now + timedelta(
                        days=400 + rng.randrange(10**6), minutes=5 * rng.randrange(200)
                    )
                    await self.slots.CreateSlot(
                        spb.CreateSlotRequest(
                            specialist_id=specialist_id,
                            start_time=_ts(start),
                            end_time=_ts(start + timedelta(minutes=5)),
                        ),
                        metadata=self.md,
                        timeout=10,
                    )
                    out.writes += 1
                    out.codes["OK"] += 1
                    continue
                began = time.perf_counter()
                kind = rng.randrange(4)
                if kind == 0:
                    await self.slots.ListSlots(
                        spb.ListSlotsRequest(specialist_id=specialist_id, page_size=SLOTS),
                        metadata=self.md,
                        timeout=10,
                    )
                elif kind == 1:
                    await self.specialists.GetSpecialist(
                        sppb.GetSpecialistRequest(id=specialist_id), metadata=self.md, timeout=10
                    )
                elif kind == 2:
                    # The specialist's event stream from its start (its
                    # holds, made at the phase's setup).
                    await self.appointments.ListAppointmentEvents(
                        apb.ListAppointmentEventsRequest(
                            filter=apb.AppointmentEventFilter(specialist_id=specialist_id),
                            page_size=SLOTS,
                        ),
                        metadata=self.md,
                        timeout=10,
                    )
                else:
                    await self.slots.SearchAvailableSlots(
                        spb.SearchAvailableSlotsRequest(
                            service_type=service_type,
                            window_start_time=window[0],
                            window_end_time=window[1],
                            page_size=10,
                        ),
                        metadata=self.md,
                        timeout=10,
                    )
                out.read_latency.append(time.perf_counter() - began)
                out.reads += 1
                out.codes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                out.codes[err.code().name] += 1


@dataclass
class Outcome:
    """One phase's figures."""

    measured: Measured
    seconds: float
    cpu: dict[str, dict[str, float]]
    process_cpu: float
    standby_reads: int
    primary_reads: int
    token_waits: list[float]
    fallbacks: dict[str, int]


def _cpu(cluster: Cluster) -> dict[str, dict[str, float]]:
    return {n.name: n.cpu() for n in [cluster.primary, *cluster.standbys]}


def _delta(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    return {
        name: {k: v - before.get(name, {}).get(k, 0.0) for k, v in kinds.items()}
        for name, kinds in after.items()
    }


def _process_cpu() -> float:
    return sum(os.times()[:2])


async def _phase(
    cluster: Cluster,
    srv: Any,
    token: str,
    callers: int,
    seconds: float,
    write_share: float,
    tokens: bool,
    seed: str,
) -> Outcome:
    from booking.v1 import appointment_pb2 as apb
    from booking.v1 import appointment_pb2_grpc, slot_pb2_grpc, specialist_pb2_grpc
    from booking.v1 import slot_pb2 as spb
    from booking.v1 import specialist_pb2 as sppb
    from booking_client import Session, insecure_channel

    target = f"127.0.0.1:{srv.port}"
    md = (("authorization", f"Bearer {token}"),)
    service_type = f"bench-{seed}"
    # A fresh specialist (and service type) per phase: every phase's reads
    # see the same number of slots. A fresh client too: its holds' times
    # are the same in every phase, and a user holds no two at once.
    client_id, _ = await _user(srv, "CLIENT")
    async with grpc.aio.insecure_channel(target) as setup:
        specialists = specialist_pb2_grpc.SpecialistServiceStub(setup)
        slots = slot_pb2_grpc.SlotServiceStub(setup)
        reply = await specialists.CreateSpecialist(
            sppb.CreateSpecialistRequest(full_name="Dr. Bench", service_type=service_type),
            metadata=md,
        )
        specialist_id = reply.specialist.id
        day0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        appointments = appointment_pb2_grpc.AppointmentServiceStub(setup)
        for day in range(SLOTS):
            start = day0 + timedelta(days=1 + day)
            created = await slots.CreateSlot(
                spb.CreateSlotRequest(
                    specialist_id=specialist_id,
                    start_time=_ts(start),
                    end_time=_ts(start + timedelta(minutes=30)),
                ),
                metadata=md,
            )
            if day % 2:
                # Half the slots held: the specialist's event stream has
                # SLOTS / 2 events for the ListAppointmentEvents reads.
                await appointments.HoldSlot(
                    apb.HoldSlotRequest(slot_id=created.slot.id, user_id=client_id),
                    metadata=md,
                )
    routed = srv.db.standbys if srv.db is not None else None
    waits0 = len(routed.counters.token_waits) if routed else 0
    standby0 = routed.counters.standby if routed else 0
    fallbacks0 = dict(routed.fallbacks) if routed else {}
    channels = [
        insecure_channel(target, interceptors=[Session()] if tokens else []) for _ in range(callers)
    ]
    measured = Measured()
    try:
        cpu0, process0, wall0 = _cpu(cluster), _process_cpu(), time.monotonic()
        until = wall0 + seconds
        await asyncio.gather(
            *(
                Caller(ch, token).run(
                    specialist_id,
                    service_type,
                    measured,
                    until,
                    write_share,
                    random.Random(f"{seed}-{i}"),
                )
                for i, ch in enumerate(channels)
            )
        )
        wall = time.monotonic() - wall0
        cpu = _delta(_cpu(cluster), cpu0)
        process = _process_cpu() - process0
    finally:
        for ch in channels:
            await ch.close(grace=None)
    standby_reads = routed.counters.standby - standby0 if routed else 0
    return Outcome(
        measured,
        wall,
        cpu,
        process,
        standby_reads,
        measured.reads - standby_reads,
        routed.counters.token_waits[waits0:] if routed else [],
        {k: v - fallbacks0.get(k, 0) for k, v in (routed.fallbacks if routed else {}).items()},
    )


async def _user(srv: Any, role: str) -> tuple[str, str]:
    """A new user of `role` made in storage: its id and email (password
    PASSWORD)."""
    from service import passwords
    from storage import users
    from storage.models import Role

    email = f"{role.lower()}-{random.randrange(10**12)}@bench.example"
    user = await users.create(
        srv.db,
        email=email,
        password_hash=await passwords.hash_password(PASSWORD),
        role=Role(role),
    )
    return str(user.id), email


async def _admin_token(srv: Any, target: str) -> str:
    """An ADMIN's access token, the callers' and the setup's."""
    from booking.v1 import auth_pb2, auth_pb2_grpc

    _, email = await _user(srv, "ADMIN")
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(email=email, password=PASSWORD)
        )
    return str(reply.access_token)


async def _repeat(
    cluster: Cluster, data_dir: Path, callers: int, seconds: float, rep: int
) -> dict[str, Outcome]:
    from service.config import Config
    from service.server import BookingServer

    results: dict[str, Outcome] = {}
    # Alternating the order by repeat: slow drift touches both sides alike.
    groups = [(True, PHASES[:2]), (False, PHASES[2:])]
    if rep % 2:
        groups.reverse()
    for on_primary, phases in groups:
        config = Config(
            host="127.0.0.1",
            port=0,
            database_url=cluster.primary.url(),
            data_dir=data_dir,
            pool_min_size=callers + 2,
            pool_max_size=callers + 2,
            sweep_interval_seconds=3600.0,
            grace_seconds=1.0,
            migrate_on_start=False,
            read_database_url=cluster.read_url(),
            reads_on_primary=on_primary,
        ).validate()
        srv = BookingServer(config)
        await srv.start()
        try:
            token = await _admin_token(srv, f"127.0.0.1:{srv.port}")
            # Unmeasured: a new server opens its sessions (primary and
            # standbys) and asyncpg prepares its statements on each; the
            # first measured phase would pay for them.
            await _phase(
                cluster,
                srv,
                token,
                callers,
                min(seconds, WARM_UP_SECONDS),
                WRITE_SHARE,
                True,
                f"warm-{on_primary}-{rep}",
            )
            for key, _, _, share, tokens in phases:
                results[key] = await _phase(
                    cluster, srv, token, callers, seconds, share, tokens, f"{key}-{rep}"
                )
        finally:
            await srv.stop(grace=1)
    return results


# -- the scenario -----------------------------------------------------------------


def prepare(b: Bench) -> None:
    if not client_package():
        b.notes.append(
            "standby-reads scenario skipped: booking_client (clients/python) is not importable"
        )
        return
    b.progress.info("standby-reads: a primary and two streaming standbys (pg_basebackup) ...")
    cluster = make_cluster(durable=not b.opts.unsafe_fast)
    b.checks.setdefault("standby_reads", {})["nodes"] = 3
    b.cleanups.append(cluster.close)
    b.standby_reads = cluster


def _ms(values: list[float], q: float) -> float | None:
    value = percentile(sorted(values), q)
    return None if value is None else value * 1000


def samples(outcomes: dict[str, Outcome]) -> dict[str, dict[str, Any]]:
    """Each phase's sample, the primary's CPU per read against the
    all-on-primary phase of the same repeat."""

    def per_write_of(key: str) -> float:
        o = outcomes[key]
        return o.cpu["primary"].get("backend", 0.0) / max(1, o.measured.writes)

    base: float | None = None
    out: dict[str, dict[str, Any]] = {}
    for key, _, on_primary, _, _ in PHASES:
        # A write costs the primary one more round trip while standby reads
        # are on (its token): each side's writes at that side's cost.
        per_write = per_write_of("writes" if on_primary else "token_writes")
        o = outcomes[key]
        m = o.measured
        ops = m.reads + m.writes
        primary = o.cpu["primary"]
        backends = primary.get("backend", 0.0)
        standby_cpu = sum(sum(v.values()) for k, v in o.cpu.items() if k != "primary")
        sample: dict[str, Any] = {
            "throughput": (m.writes if "writes" in key else m.reads) / o.seconds,
            "server_cpu_us": None,
            "process_cpu_us": o.process_cpu / max(1, ops) * 1e6,
            "codes": dict(m.codes),
            "calls": ops,
            "ok": m.codes.get("OK", 0),
            "reads": m.reads,
            "writes": m.writes,
            "wall_seconds": o.seconds,
            "walsender_cpu_us": primary.get("walsender", 0.0) / max(1, ops) * 1e6,
            "primary_other_cpu_us": primary.get("other", 0.0) / max(1, ops) * 1e6,
            "cpu_seconds": o.cpu,
        }
        if key in ("writes", "token_writes"):
            sample["pg_cpu_us"] = per_write * 1e6
            if key == "token_writes":
                sample["token_cost_us"] = (per_write - per_write_of("writes")) * 1e6
            out[key] = sample
            continue
        # Read work on the primary: its sessions' CPU less the writes' share
        # (the walsenders and the background processes work for the writes
        # whatever the reads do; reported apart).
        per_read = max(0.0, backends - m.writes * per_write) / max(1, m.reads)
        if key == "primary":
            base = per_read
        lat = [v * 1000 for v in m.read_latency]
        sample |= {
            "pg_cpu_us": per_read * 1e6,
            "p50_ms": percentile(sorted(lat), 50.0),
            "p99_ms": percentile(sorted(lat), 99.0),
            "max_ms": max(lat, default=None),
            "standby_reads": o.standby_reads,
            "primary_reads": o.primary_reads,
            "standby_share_pct": 100.0 * o.standby_reads / max(1, m.reads),
            "standby_pg_cpu_us": standby_cpu / max(1, o.standby_reads) * 1e6
            if o.standby_reads
            else None,
            "fallbacks": sum(o.fallbacks.values()),
            "fallback_reasons": o.fallbacks,
        }
        if base:
            sample["off_primary_pct"] = 100.0 * (1 - per_read / base)
        if o.token_waits:
            for name, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)):
                sample[f"token_wait_{name}_ms"] = _ms(o.token_waits, q)
            sample["token_waits"] = len(o.token_waits)
        out[key] = sample
    return out


def callers_of(b: Bench) -> int:
    return max(b.opts.read_concurrency)


def scenario(b: Bench) -> None:
    cluster: Cluster | None = b.standby_reads
    if cluster is None:
        return
    callers = callers_of(b)
    b.progress.info(
        f"  standby-reads: {len(PHASES)} phases of {b.opts.duration:g}s, {callers} callers"
    )
    data_dir = b.run_dir / "standby-reads"
    data_dir.mkdir(parents=True, exist_ok=True)
    outcomes = asyncio.run(_repeat(cluster, data_dir, callers, b.opts.duration, b.rep))
    for key, sample in samples(outcomes).items():
        label = next(p[1] for p in PHASES if p[0] == key)
        fig = b.figure(
            f"standby_reads.{key}.c{callers}",
            "standby-reads",
            f"{label}, {callers} callers (primary PostgreSQL CPU per read; reads/s)",
            throughput_unit="writes/s" if "writes" in key else "reads/s",
            extras=EXTRAS,
        )
        b.report_run(fig, sample)


# -- goals ------------------------------------------------------------------------


def _mean(fig: Figure | None, metric: str) -> float | None:
    if fig is None:
        return None
    sp = fig.spread(metric)
    return None if sp is None else sp.mean


def _phase_fig(figures: dict[str, Figure], key: str) -> Figure | None:
    return next(
        (f for k, f in figures.items() if k.startswith(f"standby_reads.{key}.c")),
        None,
    )


def goals(b: Any) -> list[Goal]:
    """The scenario's goals, from this run's figures; none without them."""
    figs: dict[str, Figure] = b.figures
    primary = _phase_fig(figs, "primary")
    if primary is None:
        return []
    out: list[Goal] = []
    base = _mean(primary, "pg_cpu_us")
    for key, what in (("tokens", "with tokens"), ("standbys", "without tokens")):
        fig = _phase_fig(figs, key)
        per_read = _mean(fig, "pg_cpu_us")
        name = f"standby reads {what}: read work off the primary (its PostgreSQL CPU per read)"
        target = f">= {OFF_PRIMARY_GOAL:.0%}"
        if fig is None or per_read is None or not base:
            out.append(Goal(name, target, "not measured", None))
            continue
        off = 1 - per_read / base
        share = _mean(fig, "standby_share_pct") or 0.0
        out.append(
            Goal(
                name,
                target,
                f"{per_read:,.0f} us ({fig.key}) vs {base:,.0f} us ({primary.key}) a read"
                f" = {off:.0%} off; {share:.1f}% of reads on standbys,"
                f" {_mean(fig, 'fallbacks') or 0:.0f} fallbacks to the primary a run",
                off >= OFF_PRIMARY_GOAL,
            )
        )
    untokened, tokened = _phase_fig(figs, "standbys"), _phase_fig(figs, "tokens")
    for name, num, den in (
        ("standby reads: read latency without tokens vs on the primary", untokened, primary),
        ("standby reads: read latency with tokens vs without", tokened, untokened),
    ):
        target = f"p99 <= {LATENCY_LIMIT:g}x"
        a50, c50 = _mean(num, "p50_ms"), _mean(den, "p50_ms")
        a99, c99 = _mean(num, "p99_ms"), _mean(den, "p99_ms")
        if num is None or den is None or None in (a50, c50, a99, c99) or not c50 or not c99:
            out.append(Goal(name, target, "not measured", None))
            continue
        assert a50 is not None and a99 is not None
        out.append(
            Goal(
                name,
                target,
                f"p50 {a50:.2f} vs {c50:.2f} ms = {a50 / c50:.2f}x; p99 {a99:.2f} vs"
                f" {c99:.2f} ms = {a99 / c99:.2f}x ({num.key} vs {den.key})",
                a99 / c99 <= LATENCY_LIMIT,
            )
        )
    name = "standby reads: token waits (read-your-writes on a standby)"
    target = (
        f"p99 <= {TOKEN_WAIT_P99_MS:g} ms; fallbacks to the primary <= {FALLBACK_LIMIT:.0%}"
        " of tokened reads"
    )
    p50, p90, p99, top = (
        _mean(tokened, f"token_wait_{q}_ms") for q in ("p50", "p90", "p99", "max")
    )
    reads = _mean(tokened, "reads")
    if tokened is None or p99 is None or not reads:
        out.append(Goal(name, target, "not measured", None))
        return out
    fallbacks = _mean(tokened, "fallbacks") or 0.0
    share = fallbacks / reads
    out.append(
        Goal(
            name,
            target,
            f"p50 {p50 or 0:.2f}, p90 {p90 or 0:.2f}, p99 {p99:.2f}, max {top or 0:.2f} ms;"
            f" {fallbacks:.0f} fallbacks in {reads:,.0f} reads = {share:.2%} ({tokened.key})",
            p99 <= TOKEN_WAIT_P99_MS and share <= FALLBACK_LIMIT,
        )
    )
    return out


def cli(argv: list[str] | None = None) -> int:
    """``python -m bench.standby_reads [bench options]``: the bench with
    this scenario alone."""
    from bench import harness

    args = list(sys.argv[1:] if argv is None else argv)
    return harness.main(["--scenarios", SCENARIO, "--no-pgbench", *args])


if __name__ == "__main__":
    sys.exit(cli())
