"""The scenarios. Each function runs one repeat of its scenario (every
configuration once) and appends one sample to each of its figures; the
harness calls them repeat by repeat, so slow drift on a shared machine
touches every figure alike instead of biasing the ones measured last."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from bench import db, history, pgbench, standby_reads
from bench import profile as profiling
from bench.context import Bench, Run, rusage_children_seconds, split
from bench.load import Job, latencies_of
from bench.procs import ServerProcess, vm_rss_kib
from bench.stats import latency_ms
from booking.v1 import auth_pb2, auth_pb2_grpc
from storage import backfill, migrate
from storage.database import Database

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
    # The database floor: one round trip of a trivial statement through the
    # booking server's pool, interceptor, authentication and log line.
    for c in b.opts.echo_concurrency:
        fig = b.figure(
            f"floor.round_trip.c{c}",
            "echo",
            f"database floor: one asyncpg round trip (SELECT 1) on the booking server,"
            f" concurrency {c}",
        )
        run = b.load(f"floor c={c}", b.hold_jobs(c, "floor", [server]), [server])
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
        extras=[
            ("one_winner_pct", "rounds with exactly one winner", "%"),
            ("untrue_refusals", "refusals before any committed hold", ""),
        ],
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
            m = merged.setdefault(
                r["round"], {"start": r["start"], "end": 0.0, "codes": [], "refused_at": []}
            )
            m["start"] = min(m["start"], r["start"])
            m["end"] = max([m["end"], *r["answers"]])
            m["codes"].extend(r["codes"])
            m["refused_at"].extend(
                w for c, w in zip(r["codes"], r["walls"], strict=True) if c != "OK"
            )
    times = [m["end"] - m["start"] for m in merged.values()]
    codes: Counter[str] = Counter()
    one_winner = 0
    for m in merged.values():
        codes.update(m["codes"])
        one_winner += m["codes"].count("OK") == 1
    live = asyncio.run(db.slot_states(b.db.url, 0, rounds))
    db_ok = sum(1 for k in range(rounds) if live.get(str(db.pool_uuid(db.POOL_SLOT, k))) == 1)
    untrue = _untrue_refusals(b, merged)
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
    if untrue is not None:
        sample["untrue_refusals"] = untrue
    b.report_run(fig, sample)
    total = b.checks.setdefault(
        "contention", {"rounds": 0, "one_winner_rounds": 0, "db_one_live_appointment": 0}
    )
    total["rounds"] += len(merged)
    total["one_winner_rounds"] += one_winner
    total["db_one_live_appointment"] += db_ok
    total["expected_rounds"] = total.get("expected_rounds", 0) + rounds
    if untrue is not None:
        total["untrue_refusals"] = total.get("untrue_refusals", 0) + untrue


def _untrue_refusals(b: Bench, merged: dict[int, dict[str, Any]]) -> int | None:
    """Refusals no committed hold justified (count_untrue_refusals); None
    when the server keeps no commit timestamps."""
    committed = asyncio.run(db.hold_commit_times(b.db.url, 0, b.opts.rounds))
    if committed is None:
        return None
    by_round = {r: committed.get(str(db.pool_uuid(db.POOL_SLOT, r))) for r in merged}
    return count_untrue_refusals({r: m["refused_at"] for r, m in merged.items()}, by_round)


def count_untrue_refusals(
    refused_at: dict[int, list[float]], committed: dict[int, float | None]
) -> int:
    """Every refusal in a round whose slot ended up free, and every refusal
    answered (wall clock) before the round's winning hold committed."""
    untrue = 0
    for r, times in refused_at.items():
        at = committed.get(r)
        untrue += sum(1 for t in times if at is None or t < at)
    return untrue


def _per(seconds: float | None, n: int) -> float | None:
    return None if seconds is None or n == 0 else seconds / n * 1e6


# -- seats: a herd on a slot of several seats, and the single-seat hold ---------------

SEAT_HERD_SEATS = 5
# Pool slots of the seat herd: far from the ones contention and the holds use.
SEAT_HERD_FIRST = 4000


def seats(b: Bench) -> None:
    """The single-seat HoldSlot (the default path, every slot of capacity
    1) at each concurrency, and `contenders` clients racing for a slot of
    SEAT_HERD_SEATS seats, round after round: exactly that many win."""
    server = b.ensure_primary()
    for c in b.opts.concurrency:
        fig = b.figure(f"seats.single.c{c}", "seats", f"single-seat HoldSlot, concurrency {c}")
        b.reset()
        run = b.load(f"single-seat HoldSlot c={c}", b.hold_jobs(c, "hold", [server]), [server])
        b.report_run(fig, run.sample())
    # One seat of a slot of SEAT_HERD_SEATS: the multi-seat path (no
    # coalescing of a slot's herd, the seat count checked in the statement).
    for c in b.opts.concurrency:
        fig = b.figure(
            f"seats.multi.c{c}",
            "seats",
            f"HoldSlot of one seat of a {SEAT_HERD_SEATS}-seat slot, concurrency {c}",
        )
        b.reset()
        asyncio.run(db.set_capacity(b.db.url, 0, b.seeded.pool_size, SEAT_HERD_SEATS))
        try:
            run = b.load(f"multi-seat HoldSlot c={c}", b.hold_jobs(c, "hold", [server]), [server])
        finally:
            b.reset()
            asyncio.run(db.set_capacity(b.db.url, 0, b.seeded.pool_size, 1))
        b.report_run(fig, run.sample())
    rounds, contenders = b.opts.rounds, b.opts.contenders
    # Fewer contenders than seats (--quick) all win.
    n = min(SEAT_HERD_SEATS, contenders)
    first = min(SEAT_HERD_FIRST, max(0, b.seeded.pool_size - rounds))
    fig = b.figure(
        f"seats.herd{SEAT_HERD_SEATS}.c{contenders}",
        "seats",
        f"{contenders} clients hold one slot of {SEAT_HERD_SEATS} seats ({rounds} rounds):"
        " time until all answered",
        throughput_unit="rounds/s",
        extras=[("exact_winners_pct", f"rounds with exactly {n} winners", "%")],
    )
    b.reset()
    asyncio.run(db.set_capacity(b.db.url, first, rounds, SEAT_HERD_SEATS))
    try:
        parts = split(contenders, b.pool.size)
        parts += [0] * (b.pool.size - len(parts))
        jobs, user = {}, 0
        for i, c in enumerate(parts):
            jobs[i] = Job(
                kind="contention",
                concurrency=c,
                target=server.target,
                token=b.token,
                first=first,
                rounds=rounds,
                user_first=user,
            )
            user += c
        meter = b.meter([server])
        results = b.pool.run(jobs, 5.0 + rounds * 2.0, on_ready=meter.start)
        cpu = meter.stop()
        live = asyncio.run(db.slot_states(b.db.url, first, rounds))
    finally:
        b.reset()
        asyncio.run(db.set_capacity(b.db.url, first, rounds, 1))
    merged: dict[int, dict[str, Any]] = {}
    for result in results:
        for r in result["rounds"]:
            m = merged.setdefault(r["round"], {"start": r["start"], "end": 0.0, "codes": []})
            m["start"] = min(m["start"], r["start"])
            m["end"] = max([m["end"], *r["answers"]])
            m["codes"].extend(r["codes"])
    times = [m["end"] - m["start"] for m in merged.values()]
    codes: Counter[str] = Counter()
    exact = 0
    for m in merged.values():
        codes.update(m["codes"])
        exact += m["codes"].count("OK") == n
    db_ok = sum(
        1 for k in range(rounds) if live.get(str(db.pool_uuid(db.POOL_SLOT, first + k))) == n
    )
    total_answers = sum(codes.values())
    wall = sum(times)
    b.report_run(
        fig,
        {
            "throughput": len(times) / wall if wall else None,
            **latency_ms(times),
            "server_cpu_us": _per(cpu.get("server"), total_answers),
            "pg_cpu_us": _per(cpu.get("postgres"), total_answers),
            "rounds": len(merged),
            "exact_winner_rounds": exact,
            "exact_winners_pct": 100.0 * exact / len(merged) if merged else 0.0,
            "db_exact_live_appointments": db_ok,
            "answers": total_answers,
            "codes": dict(codes),
        },
    )
    total = b.checks.setdefault(
        "seat_herd", {"seats": n, "rounds": 0, "exact_winner_rounds": 0, "db_exact": 0}
    )
    total["rounds"] += len(merged)
    total["exact_winner_rounds"] += exact
    total["db_exact"] += db_ok
    total["expected_rounds"] = total.get("expected_rounds", 0) + rounds


# -- series: HoldSeries of ten occurrences ----------------------------------------------


def series(b: Bench) -> None:
    """HoldSeries, all or nothing, of SERIES_OCCURRENCES daily occurrences
    on free slots, closed loop; per-occurrence cost next to a single hold's."""
    server = b.ensure_primary()
    n_series = db.series_count(b.seeded.pool_size)
    for c in b.opts.series_concurrency:
        fig = b.figure(
            f"series.hold{db.SERIES_OCCURRENCES}.c{c}",
            "series",
            f"HoldSeries of {db.SERIES_OCCURRENCES} occurrences, concurrency {c}",
            throughput_unit="series/s",
        )
        b.reset()
        jobs = b.hold_jobs(c, "hold_series", [server])
        per = n_series // len(jobs)
        for i, job in jobs.items():
            job.first, job.count = i * per, per
        run = b.load(f"HoldSeries c={c}", jobs, [server])
        b.report_run(fig, run.sample())


# -- webhooks: what a subscribed endpoint adds to every hold ---------------------------


class _Receiver:
    """A webhook receiver in the harness's own process (its CPU is not the
    server's): answers every POST 204 and counts them."""

    def __init__(self) -> None:
        import http.server
        import threading

        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver.lock:
                    receiver.received += 1

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.lock = threading.Lock()
        self.received = 0
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/hook"

    def count(self) -> int:
        with self.lock:
            return self.received

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join(5)


def webhooks(b: Bench) -> None:
    """HoldSlot with no webhook endpoint, then with one subscribed to every
    event (a receiver answering 204 at once), alternating the order by
    repeat. The hold's cost includes the dispatcher's: reading the events,
    POSTing them and moving the endpoint's cursor, in the same server and
    database."""
    from booking.v1 import webhook_pb2, webhook_pb2_grpc

    server = b.ensure_primary()
    c = max(b.opts.concurrency)
    receiver = _Receiver()
    try:
        order = ("none", "subscribed") if b.rep % 2 == 0 else ("subscribed", "none")
        for side in order:
            fig = b.figure(
                f"webhooks.hold.{side}.c{c}",
                "webhooks",
                f"HoldSlot, concurrency {c}, "
                + ("one webhook endpoint subscribed" if side == "subscribed" else "no endpoint"),
                extras=[("delivered_pct", "delivered in the window", "%")],
            )
            asyncio.run(db.delete_webhook_endpoints(b.db.url))
            b.reset()
            if side == "subscribed":
                with grpc.insecure_channel(server.target) as channel:
                    webhook_pb2_grpc.WebhookServiceStub(channel).CreateWebhookEndpoint(
                        webhook_pb2.CreateWebhookEndpointRequest(url=receiver.url),
                        metadata=(("authorization", f"Bearer {b.token}"),),
                        timeout=10,
                    )
            before = receiver.count()
            run = b.load(f"webhooks {side} c={c}", b.hold_jobs(c, "hold", [server]), [server])
            sample = run.sample()
            ok = sample.get("ok") or 0
            sample["webhook_posts"] = receiver.count() - before
            if side == "subscribed":
                sample["delivered_pct"] = 100.0 * sample["webhook_posts"] / ok if ok else None
            b.report_run(fig, sample)
    finally:
        asyncio.run(db.delete_webhook_endpoints(b.db.url))
        receiver.close()


# -- events: commit-to-receipt latency, and idle streams' memory -----------------------

PRIME_RANGE = 2000  # pool indices kept out of the load for priming holds


def _prime(
    b: Bench,
    indices: list[int],
    expected: int,
    first: int,
    timeout: float = 30.0,
    server: ServerProcess | None = None,
) -> int:
    """Make holds until every stream has received something (so it is
    surely open on the server); returns how many holds it took."""
    server = server or b.ensure_primary()
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
    if b.pool.size < 2:
        raise SystemExit("the events scenario needs --client-procs 2 or more")
    previous: Path | None = b.previous_release
    for streams in b.opts.event_streams:
        # This release and the previous one in turn, the order alternating
        # by repeat, each server alone on the database while it is measured.
        sides = ["", "previous"] if previous is not None else [""]
        if b.rep % 2 == 1:
            sides.reverse()
        for release in sides:
            if release:
                assert previous is not None
                b.stop_primary()
                old = ServerProcess.previous(
                    previous, b.db.url, b.run_dir / "logs" / "server-previous.log", b._server_env()
                )
                old.start()
                try:
                    _events_run(b, old, streams, release)
                finally:
                    old.stop()
            else:
                # A fresh server, as the previous release's is: the reset
                # between runs truncates the log under a running server,
                # whose ring then holds events the table no longer has, and
                # streams that resumed from one ended with OUT_OF_RANGE
                # (CURSOR_NOT_IN_HISTORY, as after an asynchronous failover).
                b.stop_primary()
                _events_run(b, b.ensure_primary(), streams, release)
    _idle_streams(b)


def _events_run(b: Bench, server: ServerProcess, streams: int, release: str) -> None:
    """One events figure: `streams` streams on `server` while it takes the
    paced holds; `release` is "" for this one, "previous" for the
    previous release's server."""
    watchers = list(range(1, b.pool.size))
    load_count = b.seeded.pool_size - PRIME_RANGE
    fig = b.figure(
        f"events.{release + '.' if release else ''}streams{streams}",
        "events",
        f"event delivery (commit to receipt), {streams} stream(s), "
        f"{b.opts.event_rate:g} holds/s" + (", the previous release's server" if release else ""),
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
    _prime(b, used, streams, load_count, server=server)
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


def _idle_streams(b: Bench) -> None:
    n = b.opts.idle_streams
    if n <= 0:
        return
    b.stop_primary()  # a fresh server for the truncated log, as in _events_run's caller
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


# -- standby: the price of a synchronous standby --------------------------------------

STANDBY_NAME = "bench_standby"


@dataclass
class StandbyData:
    pg: Any  # storage.embedded.EmbeddedPostgres: the standby
    primary: Any  # storage.embedded.EmbeddedPostgres: the bench's server
    running: bool = True


def prepare_standby(b: Bench) -> None:
    """A hot standby of the bench's embedded PostgreSQL (pg_basebackup on
    loopback, durable like the primary), made once per run."""
    from storage import basebackup

    if b.db.embedded is None:
        b.notes.append(
            "standby scenario skipped: it needs the embedded PostgreSQL (not --database-url)"
        )
        return
    b.progress.info("standby: pg_basebackup of the bench's PostgreSQL ...")
    # The slot keeps the WAL written while the standby is stopped (the
    # single-PostgreSQL runs), so it catches up when started again.
    pg = basebackup.make_standby(
        b.db.embedded, b.run_dir / "standby", STANDBY_NAME, max_connections=300, slot=STANDBY_NAME
    )
    b.standby = StandbyData(pg, b.db.embedded)
    b.cleanups.append(functools.partial(_drop_standby, b.standby, b.db.admin_url))


def _stop_standby(data: StandbyData) -> None:
    if data.running:
        data.pg.stop()
        data.running = False


def _drop_standby(data: StandbyData, admin_url: str) -> None:
    _stop_standby(data)

    async def drop() -> None:
        conn = await db.connect(admin_url)
        try:
            await conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = $1",
                STANDBY_NAME,
            )
        finally:
            await conn.close()

    asyncio.run(drop())


async def _set_synchronous(admin_url: str, names: str) -> None:
    conn = await db.connect(admin_url)
    try:
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        await conn.execute("SELECT pg_reload_conf()")
        # A reload is asynchronous: wait until a new session sees it, and for
        # the standby to stream as the synchronous one.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            check = await db.connect(admin_url)
            try:
                shown = await check.fetchval("SHOW synchronous_standby_names")
                sync = await check.fetchval(
                    "SELECT count(*) FROM pg_stat_replication"
                    " WHERE application_name = $1 AND state = 'streaming' AND sync_state = 'sync'",
                    STANDBY_NAME,
                )
            finally:
                await check.close()
            if shown == names and (not names or sync == 1):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"synchronous_standby_names = '{names}' did not take effect in 60s")
    finally:
        await conn.close()


def standby(b: Bench) -> None:
    """HoldSlot and Hold+Confirm against the single PostgreSQL (the standby
    stopped, synchronous_standby_names empty) and against the same primary
    with the standby streaming as its synchronous standby (every commit
    waits for the standby's WAL flush), alternating the order by repeat."""
    data: StandbyData | None = b.standby
    if data is None:
        return
    from bench.procs import postgres_cpu_seconds
    from storage import embedded

    server = b.ensure_primary()
    hold_c = sorted({1, max(b.opts.concurrency)})
    pair_c = max(b.opts.pair_concurrency)
    order = ("single", "sync") if b.rep % 2 == 0 else ("sync", "single")
    for side in order:
        if side == "single":
            asyncio.run(_set_synchronous(b.db.admin_url, ""))
            _stop_standby(data)
        else:
            if not data.running:
                data.pg = embedded.start(data.pg.data_dir, max_connections=300)
                data.running = True
            asyncio.run(_set_synchronous(b.db.admin_url, STANDBY_NAME))
        what = (
            "single PostgreSQL"
            if side == "single"
            else "primary + 1 synchronous standby (loopback)"
        )
        runs = [("hold", c, f"HoldSlot, concurrency {c}") for c in hold_c]
        runs.append(
            ("hold_confirm", pair_c, f"HoldSlot+ConfirmAppointment pairs, concurrency {pair_c}")
        )
        for method, c, label in runs:
            fig = b.figure(
                f"standby.{method}.{side}.c{c}",
                "standby",
                f"{label}, {what}",
                throughput_unit="pairs/s" if method == "hold_confirm" else "calls/s",
                extras=[("standby_cpu_us", "standby PostgreSQL CPU", " us/call")],
            )
            b.reset()
            standby_pid = _postmaster_pid(data) if data.running else None
            before = postgres_cpu_seconds(standby_pid)
            run = b.load(f"{method} ({side}) c={c}", b.hold_jobs(c, method, [server]), [server])
            after = postgres_cpu_seconds(standby_pid)
            sample = run.sample()
            if before is not None and after is not None:
                sample["standby_cpu_us"] = run.per_call_us(after - before, run.codes.get("OK", 0))
            b.report_run(fig, sample)
    # Leave the primary as the other scenarios expect it: alone.
    asyncio.run(_set_synchronous(b.db.admin_url, ""))
    _stop_standby(data)


def _postmaster_pid(data: StandbyData) -> int | None:
    try:
        return int((data.pg.pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


# -- history: the hot paths with 10 million rows behind them --------------------------

HISTORY_OPS = (
    ("hold", "HoldSlot"),
    ("get_slot", "GetSlot"),
    ("list_slots", "ListSlots, one specialist's day"),
    ("list_appointments", "ListAppointments, one user's upcoming"),
    ("events_resume", "ListAppointmentEvents, resume a page behind the head"),
    ("events_user", "ListAppointmentEvents, one user's events from the start"),
)
HISTORY_SIDES = ("empty", "history")


@dataclass
class HistorySide:
    name: str
    url: str
    database: str
    since: float
    resume_cursor: str
    server: ServerProcess | None = None
    token: str = ""


@dataclass
class HistoryData:
    shape: history.Shape
    seeded: db.Seeded
    sides: dict[str, HistorySide]
    load_seconds: float
    # --history-backfill: the history's slot times are left NULL for the
    # backfill, which runs during the first repeat's `backfill` side.
    backfill_pending: bool = False


def prepare_history(b: Bench) -> None:
    """Two more databases on the same server: `empty` (the fixtures only)
    and `history` (a copy of it, plus the history), made once per run."""
    base = b.db.name
    admin = b.db.admin_url
    names = {"empty": f"{base}_h0", "history": f"{base}_h1"}
    for name in names.values():
        b.cleanups.append(functools.partial(_drop, admin, name))
    urls = {side: db.with_database(admin, name) for side, name in names.items()}
    b.progress.info(f"history: fixtures in {names['empty']} ...")
    asyncio.run(db.create_database(admin, names["empty"]))
    migrate.apply(urls["empty"])
    seeded = asyncio.run(db.seed(urls["empty"], b.opts.pool_size))
    day0 = asyncio.run(db.first_future_day(urls["empty"]))
    shape = history.shape(b.opts.history_rows, b.opts.pool_size, day0)
    asyncio.run(history.fixtures(urls["empty"], shape))
    asyncio.run(db.create_database(admin, names["history"], template=names["empty"]))
    b.progress.info(
        f"history: loading {shape.rows:,} appointments and events"
        f" ({shape.specialists:,} specialists, {shape.users:,} users) into {names['history']} ..."
    )
    seconds = asyncio.run(
        history.load(
            urls["history"], shape, b.progress.info, slot_times=not b.opts.history_backfill
        )
    )
    b.progress.info(f"history: loaded in {seconds:.0f}s")
    sides = {}
    for side, url in urls.items():
        if b.profiler is not None:
            profiling.enable_function_timing(admin, names[side])
        sides[side] = HistorySide(
            side,
            url,
            names[side],
            asyncio.run(history.mark(url)),
            asyncio.run(history.resume_cursor(url)),
        )
    b.history = HistoryData(shape, seeded, sides, seconds, b.opts.history_backfill)
    b.checks["history"] = {"rows": shape.rows, "load_seconds": round(seconds, 1)}


def _drop(admin_url: str, name: str) -> None:
    asyncio.run(db.drop_database(admin_url, name))


def history_scenario(b: Bench) -> None:
    data: HistoryData = b.history
    # Alone on the database: another server's background work would be
    # counted in PostgreSQL's CPU.
    b.stop_primary()
    b.stop_secondary()
    if data.backfill_pending:
        _history_backfill(b, data)
    order = HISTORY_SIDES if b.rep % 2 == 0 else HISTORY_SIDES[::-1]
    for side_name in order:
        side = data.sides[side_name]
        # Before the server starts: its sweeper expires the last repeat's
        # holds, which would race the reset.
        asyncio.run(history.reset(side.url, side.since))
        side.server = ServerProcess.booking(
            f"server-{side_name}",
            side.url,
            b.run_dir / "logs" / f"server-{side_name}.log",
            b._server_env(),
        )
        side.server.start()
        try:
            side.token = _login(side.server, data.seeded.operator_email)
            for part, c in enumerate(b.opts.history_concurrency):
                for op, label in HISTORY_OPS:
                    _history_run(b, data, side, op, label, c, part)
        finally:
            side.server.stop()
    if b.rep == 0:
        _history_plans(b, data)


def _history_backfill(b: Bench, data: HistoryData) -> None:
    """`migrate backfill` of the history's slot times (storage/backfill.py,
    what the command runs) while the history's calls are measured against
    the same database: figures `history.<call>.backfill.cN`. The calls go
    on until the backfill is done, each op run at least once."""
    data.backfill_pending = False
    hist = data.sides["history"]
    side = HistorySide("backfill", hist.url, hist.database, hist.since, hist.resume_cursor)
    outcome: dict[str, Any] = {}

    def run_backfill() -> None:
        async def go() -> None:
            db_ = await Database.connect(side.url, min_size=1, max_size=1)
            longest = 0.0
            last = time.monotonic()

            def batch(_: backfill.Progress) -> None:
                nonlocal longest, last
                now = time.monotonic()
                longest, last = max(longest, now - last), now

            started = time.monotonic()
            try:
                done = await backfill.slot_times(db_, on_batch=batch)
                outcome["seconds"] = round(time.monotonic() - started, 1)
                outcome["batches"] = done.batches
                outcome["rows"] = done.updated
                outcome["longest_batch_ms"] = round(longest * 1000, 1)
                outcome["left"] = await backfill.slot_times_left(db_)
            finally:
                await db_.close()

        try:
            asyncio.run(go())
        except Exception as exc:  # noqa: BLE001 - reported with the figures
            outcome["error"] = repr(exc)

    asyncio.run(history.reset(side.url, side.since))
    side.server = ServerProcess.booking(
        "server-backfill", side.url, b.run_dir / "logs" / "server-backfill.log", b._server_env()
    )
    side.server.start()
    worker = threading.Thread(target=run_backfill, name="history-backfill")
    try:
        side.token = _login(side.server, data.seeded.operator_email)
        worker.start()
        c = b.opts.history_concurrency[-1]
        rounds = 0
        while worker.is_alive() or rounds == 0:
            for op, label in HISTORY_OPS:
                _history_run(b, data, side, op, label, c, len(b.opts.history_concurrency) - 1)
            rounds += 1
            asyncio.run(history.reset(side.url, side.since))
        worker.join()
    finally:
        side.server.stop()
    outcome["rounds_of_calls_during_it"] = rounds
    b.progress.info(f"history: backfill {outcome}")
    b.checks["history_backfill"] = outcome
    asyncio.run(history.vacuum_analyze(side.url))


def _login(server: ServerProcess, email: str) -> str:
    with grpc.insecure_channel(server.target) as channel:
        reply = auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(email=email, password=db.OPERATOR_PASSWORD), timeout=30
        )
    return str(reply.access_token)


def _history_run(
    b: Bench, data: HistoryData, side: HistorySide, op: str, label: str, c: int, part: int
) -> None:
    rows = data.shape.rows if side.name != "empty" else 0
    during = ", during the backfill" if side.name == "backfill" else ""
    fig = b.figure(
        f"history.{op}.{side.name}.c{c}",
        "history",
        f"{label}, {rows:,} rows of history{during}, concurrency {c}",
    )
    assert side.server is not None
    parts = split(c, b.pool.size)
    # Each concurrency's holds take their own share of the pool: the
    # database is reset once per repeat.
    share = data.seeded.pool_size // len(b.opts.history_concurrency)
    per = share // len(parts)
    reads = data.shape.reads(side.resume_cursor)
    jobs = {
        i: Job(
            kind="grpc",
            concurrency=n,
            target=side.server.target,
            token=side.token,
            method=op,
            first=part * share + i * per,
            count=per if op == "hold" else 10**9,
            seed=b.rep * 1000 + i,
            reads=reads,
        )
        for i, n in enumerate(parts)
    }
    run = b.load(f"{op} ({side.name}) c={c}", jobs, [side.server], database_url=side.url)
    sample = run.sample()
    sample["cost_us"] = (sample.get("server_cpu_us") or 0.0) + (sample.get("pg_cpu_us") or 0.0)
    b.report_run(fig, sample)


def _history_plans(b: Bench, data: HistoryData) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of the reads' SQL in both databases, for
    the notes on any read that is not flat."""
    shape = data.shape
    reader = db.pool_uuid(history.READ_USER, 0)
    specialist = db.pool_uuid(db.READ_SPECIALIST, 0)
    day = datetime.fromtimestamp(shape.day0 + 86400 * (history.FUTURE_DAYS - 1), UTC)
    plans: dict[str, dict[str, dict[str, str]]] = {}
    for side in data.sides.values():
        xid, _, seq = side.resume_cursor.partition("-")
        statements = history.read_statements(
            slot=db.pool_uuid(db.READ_SLOT, 0),
            specialist=specialist,
            day=day,
            reader=reader,
            day0=datetime.fromtimestamp(shape.day0, UTC),
            resume=(int(xid or 0), int(seq or 0)),
        )
        found = asyncio.run(history.explain(side.url, statements))
        plans[side.name] = {p.name: {"sql": p.sql, "plan": p.plan} for p in found}
    b.checks["history_plans"] = plans
    text = ["## Query plans, history scenario", ""]
    for side_name, by_name in plans.items():
        for name, p in by_name.items():
            text += [f"### {name} ({side_name})", "", "```sql", p["sql"], "```", "", "```"]
            text += [p["plan"], "```", ""]
    b.appendix.append("\n".join(text))


SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "ceiling": ceiling,
    "service": service,
    "echo": echo,
    "contention": contention,
    "seats": seats,
    "series": series,
    "webhooks": webhooks,
    "events": events,
    "reads": reads,
    "search": search,
    "replicas": replicas,
    "standby": standby,
    "history": history_scenario,
    standby_reads.SCENARIO: standby_reads.scenario,
}
PREPARE: dict[str, Callable[[Bench], None]] = {
    "reads": prepare_reads,
    "search": prepare_search,
    "standby": prepare_standby,
    "history": prepare_history,
    standby_reads.SCENARIO: standby_reads.prepare,
}
