"""The scenarios. Each function runs one repeat of its scenario (every
configuration once) and appends one sample to each of its figures; the
harness calls them repeat by repeat, so slow drift on a shared machine
touches every figure alike instead of biasing the ones measured last."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench import db, pgbench
from bench.context import Bench, Run, rusage_children_seconds, split
from bench.load import Job, latencies_of
from bench.procs import vm_rss_kib
from bench.stats import latency_ms

# -- ceiling: the hold transaction straight against PostgreSQL -------------------


def ceiling(b: Bench) -> None:
    # No booking server runs meanwhile: its event hub would read every event
    # these transactions write, taking CPU from the database.
    b.stop_primary()
    b.stop_secondary()
    binary = pgbench.find() if b.opts.pgbench else None
    if binary is None:
        if b.rep == 0:
            b.notes.append("pgbench not found (or --no-pgbench): pgbench ceiling figures skipped")
    else:
        for script in ("function", "seed"):
            for clients in b.opts.ceiling_clients:
                _pgbench_run(b, binary, script, clients)
    for sql, clients in [("function", c) for c in b.opts.ceiling_clients] + [
        ("seed", max(b.opts.ceiling_clients))
    ]:
        _asyncpg_run(b, sql, clients)


_SCRIPT_LABEL = {
    "function": "booking_hold_slot() (the service's SQL)",
    "seed": "seed BEGIN/FOR UPDATE/UPDATE/INSERT/COMMIT",
}


def _pgbench_run(b: Bench, binary: Any, script: str, clients: int) -> None:
    fig = b.figure(
        f"ceiling.pgbench.{script}.c{clients}",
        "ceiling",
        f"pgbench {_SCRIPT_LABEL[script]}, {clients} clients",
        throughput_unit="tx/s",
    )
    b.reset()
    meter = b.meter([])
    children0 = rusage_children_seconds()
    meter.start()
    result = pgbench.run(
        binary,
        b.db.url,
        script=script,
        clients=clients,
        duration=b.opts.duration,
        base=0,
        actor_id=b.seeded.operator_id,
        specialist_id=b.seeded.specialist_id,
        on_progress=lambda line: b.progress.live(f"  pgbench {script} c={clients}: {line}"),
    )
    cpu = meter.stop()
    client = rusage_children_seconds() - children0
    n = result.processed or 1
    pg_cpu = cpu.get("postgres")
    sample: dict[str, Any] = {
        "throughput": result.tps,
        **latency_ms(result.latencies),
        "server_cpu_us": None,
        "pg_cpu_us": None if pg_cpu is None else pg_cpu / n * 1e6,
        "client_cpu_us": client / n * 1e6,
        "calls": result.processed,
        "ok": result.processed - result.failed,
        "codes": {"OK": result.processed - result.failed, "FAILED": result.failed},
    }
    b.report_run(fig, sample)


def _asyncpg_run(b: Bench, sql: str, clients: int) -> None:
    fig = b.figure(
        f"ceiling.asyncpg.{sql}.c{clients}",
        "ceiling",
        f"asyncpg {_SCRIPT_LABEL[sql]}, {clients} connections",
        throughput_unit="tx/s",
    )
    b.reset()
    parts = split(clients, b.pool.size)
    per = b.seeded.pool_size // len(parts)
    jobs = {
        i: Job(
            kind="asyncpg",
            concurrency=c,
            dsn=b.db.url,
            sql=sql,
            first=i * per,
            count=per,
            actor_id=b.seeded.operator_id,
            specialist_id=b.seeded.specialist_id,
        )
        for i, c in enumerate(parts)
    }
    run = b.load(f"asyncpg {sql} c={clients}", jobs, [])
    b.report_run(fig, run.sample())


# -- service: HoldSlot through gRPC ----------------------------------------------


def service(b: Bench) -> None:
    server = b.ensure_primary()
    for c in b.opts.concurrency:
        fig = b.figure(f"service.hold.c{c}", "service", f"HoldSlot, concurrency {c}")
        b.reset()
        run = b.load(f"HoldSlot c={c}", b.hold_jobs(c, "hold", [server]), [server])
        b.report_run(fig, run.sample())
    for c in b.opts.pair_concurrency:
        fig = b.figure(
            f"service.hold_confirm.c{c}",
            "service",
            f"HoldSlot+ConfirmAppointment pairs, concurrency {c}",
            throughput_unit="pairs/s",
        )
        b.reset()
        run = b.load(f"Hold+Confirm c={c}", b.hold_jobs(c, "hold_confirm", [server]), [server])
        b.report_run(fig, run.sample())


# -- echo floor -----------------------------------------------------------------------


def echo(b: Bench) -> None:
    bare = b.ensure_echo()
    for c in b.opts.echo_concurrency:
        fig = b.figure(
            f"echo.bare.c{c}", "echo", f"echo floor: bare grpc.aio health Check, concurrency {c}"
        )
        run = b.load(f"echo c={c}", b.hold_jobs(c, "health", [bare]), [bare])
        b.report_run(fig, run.sample())
    server = b.ensure_primary()
    c = max(b.opts.echo_concurrency)
    fig = b.figure(
        f"echo.service_health.c{c}",
        "echo",
        f"health Check on the booking server, concurrency {c}",
    )
    run = b.load(f"service health c={c}", b.hold_jobs(c, "health", [server]), [server])
    b.report_run(fig, run.sample())


# -- contention: everyone wants the same slot ------------------------------------------


def contention(b: Bench) -> None:
    server = b.ensure_primary()
    rounds, contenders = b.opts.rounds, b.opts.contenders
    fig = b.figure(
        f"contention.c{contenders}",
        "contention",
        f"{contenders} clients hold one slot ({rounds} rounds): time until all answered",
        throughput_unit="rounds/s",
        extras=[("one_winner_pct", "rounds with exactly one winner", "%")],
    )
    b.reset()
    parts = split(contenders, b.pool.size)
    # The round barrier waits for every client process, busy or not.
    parts += [0] * (b.pool.size - len(parts))
    jobs, user = {}, 0
    for i, c in enumerate(parts):
        jobs[i] = Job(
            kind="contention",
            concurrency=c,
            target=server.target,
            token=b.token,
            first=0,
            rounds=rounds,
            user_first=user,
        )
        user += c
    meter = b.meter([server])

    def tick(elapsed: float, done: int) -> None:
        b.progress.live(f"  contention: round {done // len(parts)}/{rounds}  {elapsed:.1f}s")

    # Bounded by the rounds (each call by its own timeout), not a duration.
    results = b.pool.run(jobs, 5.0 + rounds * 2.0, on_ready=meter.start, on_tick=tick)
    cpu = meter.stop()
    merged: dict[int, dict[str, Any]] = {}
    for result in results:
        for r in result["rounds"]:
            m = merged.setdefault(r["round"], {"start": r["start"], "end": 0.0, "codes": []})
            m["start"] = min(m["start"], r["start"])
            m["end"] = max([m["end"], *r["answers"]])
            m["codes"].extend(r["codes"])
    times = [m["end"] - m["start"] for m in merged.values()]
    codes: Counter[str] = Counter()
    one_winner = 0
    for m in merged.values():
        codes.update(m["codes"])
        one_winner += m["codes"].count("OK") == 1
    live = asyncio.run(db.slot_states(b.db.url, 0, rounds))
    db_ok = sum(1 for k in range(rounds) if live.get(str(db.pool_uuid(db.POOL_SLOT, k))) == 1)
    total_answers = sum(codes.values())
    wall = sum(times)
    sample: dict[str, Any] = {
        "throughput": len(times) / wall if wall else None,
        **latency_ms(times),
        "server_cpu_us": _per(cpu.get("server"), total_answers),
        "pg_cpu_us": _per(cpu.get("postgres"), total_answers),
        "rounds": len(merged),
        "one_winner_rounds": one_winner,
        "one_winner_pct": 100.0 * one_winner / len(merged) if merged else 0.0,
        "db_one_live_appointment": db_ok,
        "answers": total_answers,
        "codes": dict(codes),
    }
    b.report_run(fig, sample)
    total = b.checks.setdefault(
        "contention", {"rounds": 0, "one_winner_rounds": 0, "db_one_live_appointment": 0}
    )
    total["rounds"] += len(merged)
    total["one_winner_rounds"] += one_winner
    total["db_one_live_appointment"] += db_ok
    total["expected_rounds"] = total.get("expected_rounds", 0) + rounds


def _per(seconds: float | None, n: int) -> float | None:
    return None if seconds is None or n == 0 else seconds / n * 1e6


# -- events: commit-to-receipt latency, and idle streams' memory -----------------------

PRIME_RANGE = 2000  # pool indices kept out of the load for priming holds


def _prime(b: Bench, indices: list[int], expected: int, first: int, timeout: float = 30.0) -> int:
    """Make holds until every stream has received something (so it is
    surely open on the server); returns how many holds it took."""
    server = b.ensure_primary()
    deadline = time.monotonic() + timeout
    k = first
    while b.pool.counted(indices) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {b.pool.counted(indices)} of {expected} event streams opened in {timeout:.0f}s"
            )
        if k < first + PRIME_RANGE:
            b.hold_once(server, k)
            k += 1
        time.sleep(0.2)
    return k - first


def events(b: Bench) -> None:
    server = b.ensure_primary()
    if b.pool.size < 2:
        raise SystemExit("the events scenario needs --client-procs 2 or more")
    watchers = list(range(1, b.pool.size))
    load_count = b.seeded.pool_size - PRIME_RANGE
    for streams in b.opts.event_streams:
        fig = b.figure(
            f"events.streams{streams}",
            "events",
            f"event delivery (commit to receipt), {streams} stream(s), "
            f"{b.opts.event_rate:g} holds/s",
            throughput_unit="events/s",
            extras=[
                ("holds_per_s", "load", " holds/s"),
                ("delivered_pct", "delivered", "% of holds per stream"),
            ],
        )
        b.reset()
        watch_jobs = {
            w: Job(kind="watch", target=server.target, token=b.token, streams=n)
            for w, n in zip(watchers, split(streams, len(watchers)), strict=False)
        }
        used = list(watch_jobs)
        b.pool.start_jobs(watch_jobs)
        _prime(b, used, streams, load_count)
        load_job = Job(
            kind="grpc",
            concurrency=64,
            target=server.target,
            token=b.token,
            method="hold",
            first=0,
            count=load_count,
            rate=b.opts.event_rate,
        )
        b.pool.start_jobs({0: load_job})
        meter = b.meter([server])
        meter.start()
        deadline = time.monotonic() + b.opts.duration
        b.pool.go([0, *used], deadline)
        ticker = b.progress.run_ticker(f"events {streams} stream(s)", b.opts.duration)
        while time.monotonic() < deadline:
            ticker(b.opts.duration - (deadline - time.monotonic()), b.pool.counted([0]))
            time.sleep(0.25)
        results = b.pool.collect([0, *used], timeout=30)
        cpu = meter.stop()
        load = Run.merge(results[:1], cpu)
        watched = results[1:]
        latencies: list[float] = []
        delivered = 0
        stream_errors: Counter[str] = Counter()
        first: Counter[str] = Counter()
        for w in watched:
            latencies.extend(latencies_of(w))
            delivered += int(w["events"])
            stream_errors.update(w["stream_errors"])
            first.update(w["first_message"])
        window = max((w["end"] - w["start"]) for w in watched) if watched else 0.0
        holds_ok = load.codes.get("OK", 0)
        sample: dict[str, Any] = {
            "throughput": delivered / window if window else None,
            **latency_ms(latencies),
            "server_cpu_us": _per(cpu.get("server"), holds_ok),
            "pg_cpu_us": _per(cpu.get("postgres"), holds_ok),
            "holds_per_s": holds_ok / load.wall if load.wall else None,
            "delivered_pct": 100.0 * delivered / streams / holds_ok if holds_ok else None,
            "events_received": delivered,
            "holds": holds_ok,
            "streams_opened_by_heartbeat": first.get("heartbeat", 0),
            "codes": dict(load.codes + stream_errors),
        }
        if load.dropped:
            sample["dropped"] = load.dropped
        b.report_run(fig, sample)
        pct = sample["delivered_pct"]
        if pct is not None and pct < 80:
            b.notes.append(
                f"{fig.key} run {b.rep + 1}: streams received only {pct:.0f}% of the holds"
                " made while they watched (events arriving after the window are not counted)"
            )
    _idle_streams(b)


def _idle_streams(b: Bench) -> None:
    n = b.opts.idle_streams
    if n <= 0:
        return
    server = b.ensure_primary()
    fig = b.figure(
        f"events.idle{n}",
        "events",
        f"server memory with {n:,} idle WatchAppointmentEvents streams",
        throughput_unit="",
        extras=[
            ("rss_mib", "server RSS", " MiB"),
            ("rss_before_mib", "before", " MiB"),
            ("per_stream_kib", "per stream", " KiB"),
        ],
    )
    b.reset()
    time.sleep(0.5)
    before = vm_rss_kib(server.pid) or 0
    jobs = {
        w: Job(kind="watch", target=server.target, token=b.token, streams=k)
        for w, k in enumerate(split(n, b.pool.size))
    }
    b.progress.live(f"  opening {n:,} streams")
    b.pool.start_jobs(jobs)
    _prime(b, list(jobs), n, 0, timeout=60)
    time.sleep(1.0)
    during = vm_rss_kib(server.pid) or 0
    b.pool.go(list(jobs), time.monotonic() + 0.2)
    results = b.pool.collect(list(jobs), timeout=30)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["stream_errors"])
    sample = {
        "rss_mib": during / 1024,
        "rss_before_mib": before / 1024,
        "per_stream_kib": (during - before) / n,
        "streams": n,
        "codes": dict(errors),
    }
    b.report_run(fig, sample)


# -- reads: ListSlots over a big table ------------------------------------------------


def prepare_reads(b: Bench) -> None:
    rows = b.opts.slots_rows
    b.progress.info(f"loading {rows:,} slots for the reads scenario (generate_series) ...")
    b.reads = asyncio.run(db.load_read_slots(b.db.url, rows))
    b.progress.info(
        f"  loaded in {b.reads.load_seconds:.1f}s: {b.reads.total_slots:,} slots in time_slots,"
        f" {b.reads.specialists:,} specialists"
    )


def reads(b: Bench) -> None:
    server = b.ensure_primary()
    assert b.reads is not None
    spec = {"specialists": b.reads.specialists, "days": b.reads.days, "day0": b.reads.day0}
    for c in b.opts.read_concurrency:
        fig = b.figure(
            f"reads.list_slots.c{c}",
            "reads",
            f"ListSlots, one specialist's day, {b.reads.total_slots:,} slots in table, "
            f"concurrency {c}",
        )
        jobs = b.hold_jobs(c, "list_slots", [server], reads=spec)
        for job in jobs.values():
            job.first, job.count = 0, 10**9  # reads use no pool slots
        run = b.load(f"ListSlots c={c}", jobs, [server])
        b.report_run(fig, run.sample())


# -- search: SearchAvailableSlots over a big table --------------------------------------


def prepare_search(b: Bench) -> None:
    rows = b.opts.slots_rows
    b.progress.info(f"loading {rows:,} slots for the search scenario (generate_series) ...")
    b.search = asyncio.run(db.load_search_slots(b.db.url, rows))
    b.progress.info(
        f"  loaded in {b.search.load_seconds:.1f}s: {b.search.rows:,} slots over"
        f" {b.search.specialists:,} specialists of {b.search.service_types} service types"
    )


def search(b: Bench) -> None:
    """A week's window of one service type, earliest first across its
    specialists, at concurrency 1: the latency a client waits for."""
    server = b.ensure_primary()
    assert b.search is not None
    spec = {
        "service_types": b.search.service_types,
        "days": b.search.days,
        "hour0": b.search.hour0,
    }
    fig = b.figure(
        "search.service_type_week.c1",
        "search",
        f"SearchAvailableSlots, a week of one service type, {b.search.rows:,} slots over"
        f" {b.search.specialists:,} specialists, concurrency 1",
    )
    jobs = b.hold_jobs(1, "search_slots", [server], reads=spec)
    for job in jobs.values():
        job.first, job.count = 0, 10**9  # searches use no pool slots
    run = b.load("SearchAvailableSlots c=1", jobs, [server])
    b.report_run(fig, run.sample())


# -- replicas: one database, one or two servers ----------------------------------------


def replicas(b: Bench) -> None:
    c = b.opts.replica_concurrency
    for n in (1, 2):
        fig = b.figure(
            f"replicas.{n}",
            "replicas",
            f"HoldSlot, concurrency {c}, {n} server process(es) on one database",
        )
        primary = b.ensure_primary()
        servers = [primary]
        if n == 2:
            servers.append(b.start_secondary())
        else:
            b.stop_secondary()
        b.reset()
        run = b.load(f"replicas={n} c={c}", b.hold_jobs(c, "hold", servers), servers)
        b.report_run(fig, run.sample())
    b.stop_secondary()


SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "ceiling": ceiling,
    "service": service,
    "echo": echo,
    "contention": contention,
    "events": events,
    "reads": reads,
    "search": search,
    "replicas": replicas,
}
PREPARE: dict[str, Callable[[Bench], None]] = {"reads": prepare_reads, "search": prepare_search}
