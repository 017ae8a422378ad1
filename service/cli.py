"""The booking-service command: serve, migrate, create-admin, policy-defaults,
and the subcommands tools register (bench, chaos: TOOLS_GROUP below)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from service import logs, passwords
from service.config import (
    DATABASE_FIELDS,
    Config,
    ConfigError,
    add_arguments,
    from_sources,
)
from service.server import BookingServer, database
from storage import backfill, migrate
from storage import policies as policy_store
from storage import users as user_store
from storage.database import Database
from storage.errors import EmailTaken
from storage.models import POLICY_FIELDS, Role

log = logging.getLogger("booking")


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


async def _serve(config: Config) -> int:
    server = BookingServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except Exception as exc:  # noqa: BLE001 - an operator's problem: say it plainly
        # Unreachable database, port in use, unreadable certificate: one
        # clear line, the traceback only at DEBUG.
        log.debug("start-up failed", exc_info=True)
        if config.log_json:
            log.error("cannot start: %s", exc or type(exc).__name__)
        else:
            print(f"booking-service: cannot start: {exc or type(exc).__name__}", file=sys.stderr)
        await server.stop(0)
        return 1
    except BaseException:
        await server.stop(0)
        raise
    if not config.log_json:
        # Scripts wait for this line; in JSON mode the server's own log
        # record says the same (with host and port fields).
        print(
            f"booking-service listening on {config.host}:{server.port}", file=sys.stderr, flush=True
        )
    await stop.wait()
    log.info("signal received; draining for up to %.0fs", config.grace_seconds)
    await server.stop()
    return 0


async def _serve_workers(config: Config, argv: list[str]) -> int:
    """Run `config.workers` server processes on one port (SO_REUSEPORT).

    This process owns the embedded database (if any) and the migrations;
    the workers share them. SIGTERM/SIGINT are passed on, and the exit code
    is the first non-zero one of the workers."""
    async with database(config) as dsn:
        workers_migrate = False
        if config.migrate_on_start:
            try:
                await asyncio.to_thread(migrate.apply, dsn)
            except Exception as exc:  # noqa: BLE001 - the workers wait for the database
                # Each worker retries until the database answers, then
                # migrates (yoyo takes a lock, so they do not collide).
                log.warning(
                    "database not ready, migrations left to the workers: %s",
                    (str(exc).strip().splitlines() or [type(exc).__name__])[0],
                )
                workers_migrate = True
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "BOOKING_MIGRATE_ON_START": "true" if workers_migrate else "false",
            "BOOKING_WORKERS": str(config.workers),
        }
        command = [sys.executable, "-m", "service.cli", *argv, "--worker-process"]

        def metrics_port(index: int) -> list[str]:
            # Metrics are per process: worker i serves them on the configured
            # port + i (the last flag wins); with 0 each picks a free one.
            if not config.metrics_port:
                return []
            return ["--metrics-port", str(config.metrics_port + index)]

        workers = [
            await asyncio.create_subprocess_exec(*command, *metrics_port(i), env=env)
            for i in range(config.workers)
        ]

        forwarded: set[int] = set()

        def forward(sig: signal.Signals) -> None:
            forwarded.add(-sig.value)
            for worker in workers:
                if worker.returncode is None:
                    worker.send_signal(sig)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, forward, sig)
        codes = [await w.wait() for w in workers]
    # A worker still starting up (before its own handler is installed) dies
    # of the signal forwarded to it: it stopped as asked, which is a clean stop.
    return next((c for c in codes if c != 0 and c not in forwarded), 0)


async def _backfill(dsn: str, batch_size: int) -> None:
    db = await Database.connect(dsn, min_size=1, max_size=1)
    try:

        def report(p: backfill.Progress) -> None:
            if p.batches % 100 == 0:
                print(f"slot times: {p.batches} batches, {p.updated} appointments set", flush=True)

        done = await backfill.slot_times(db, batch_size=batch_size, on_batch=report)
        left = await backfill.slot_times_left(db)
        print(f"slot times: {done.updated} appointments set in {done.batches} batches; {left} left")
    finally:
        await db.close()


async def _migrate(
    config: Config, action: str, count: int, contract: bool, batch_size: int = 5000
) -> int:
    async with database(config) as dsn:
        if action == "apply":
            applied = await asyncio.to_thread(lambda: migrate.apply(dsn, contract=contract))
            print("applied: " + (", ".join(applied) or "nothing to apply"))
            waiting = set(await asyncio.to_thread(migrate.pending_contract, dsn))
            if waiting:
                print(
                    "contract migrations waiting for `migrate apply --contract` (once no"
                    " replica of the previous release is left): " + ", ".join(sorted(waiting))
                )
        elif action == "backfill":
            await _backfill(dsn, batch_size)
        elif action == "rollback":
            rolled = await asyncio.to_thread(migrate.rollback, dsn, count)
            print("rolled back: " + (", ".join(rolled) or "nothing"))
        else:
            contracts = set(await asyncio.to_thread(migrate.contract_ids))
            for name, done in await asyncio.to_thread(migrate.status, dsn):
                kind = "  (contract)" if name in contracts else ""
                print(f"{'applied' if done else 'pending'}  {name}{kind}")
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise ConfigError("passwords do not match")
    return first


async def _create_admin(config: Config, email: str, password: str) -> int:
    problem = passwords.problem(password)
    if problem:
        print(f"password {problem}", file=sys.stderr)
        return 2
    async with database(config) as dsn:
        await asyncio.to_thread(migrate.apply, dsn)
        db = await Database.connect(dsn, min_size=1, max_size=1)
        try:
            user = await user_store.create(
                db,
                email=email,
                password_hash=await passwords.hash_password(password),
                role=Role.ADMIN,
            )
        except EmailTaken:
            print(f"a user with email {email} already exists", file=sys.stderr)
            return 1
        finally:
            await db.close()
    print(f"created ADMIN {user.email} ({user.id})")
    return 0


async def _policy_defaults(config: Config, values: dict[str, int]) -> int:
    async with database(config) as dsn:
        db = await Database.connect(dsn, min_size=1, max_size=1)
        try:
            current = (
                await policy_store.set_defaults(db, values)
                if values
                else await policy_store.defaults(db)
            )
        finally:
            await db.close()
    for name in POLICY_FIELDS:
        print(f"{name.replace('_', '-')}: {getattr(current, name)}")
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("booking-service")
    except importlib.metadata.PackageNotFoundError:  # a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="booking-service",
        description="Books appointments with specialists; double booking is impossible.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    add_arguments(serve)
    serve.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)

    mig = sub.add_parser("migrate", help="apply, roll back or list schema migrations")
    mig.add_argument(
        "action",
        nargs="?",
        choices=["apply", "rollback", "list", "backfill"],
        default="apply",
        help="apply pending migrations (default), roll back the newest, list each"
        " migration as applied or pending, or backfill the columns that expand migrations"
        " added (in short batches, under live traffic; safe to run again)",
    )
    mig.add_argument(
        "--batch-size",
        type=int,
        default=5000,
        help="with backfill: rows per transaction (default 5000)",
    )
    mig.add_argument("--count", type=int, default=1, help="migrations to roll back (default 1)")
    mig.add_argument(
        "--contract",
        action="store_true",
        help="with apply: also apply the contract migrations (they drop what only the"
        " previous release used); run it once no replica of the previous release is left",
    )
    add_arguments(mig, only=DATABASE_FIELDS)

    admin = sub.add_parser("create-admin", help="create an ADMIN user")
    admin.add_argument("--email", required=True, help="the new administrator's email address")
    admin.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input instead of prompting",
    )
    add_arguments(admin, only=DATABASE_FIELDS)

    policy = sub.add_parser(
        "policy-defaults",
        help="show or change the server-wide booking policy defaults (stored in the"
        " database, so every replica enforces the same ones)",
    )
    for name, what in (
        ("min_notice_minutes", "a CLIENT may not hold a slot starting sooner than this"),
        ("max_advance_days", "a CLIENT may not hold a slot starting further ahead than this"),
        (
            "cancellation_cutoff_hours",
            "a CLIENT may not cancel or reschedule a CONFIRMED appointment starting sooner",
        ),
    ):
        policy.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=int,
            metavar="N",
            help=f"{what}; 0 is no limit; a specialist's own value wins",
        )
    add_arguments(policy, only=DATABASE_FIELDS)

    # Listed for --help only; main() hands `bench ...` to the tool's entry point.
    for name in sorted(KNOWN_TOOLS.keys() | _tools().keys()):
        what = KNOWN_TOOLS.get(name, "a tool's subcommand")
        sub.add_parser(name, help=f"{what} (booking-service {name} --help)")
    return parser


# Subcommands other distributions add: an entry point in this group names a
# function main(argv) -> int. The benchmark and the fault-injection suite
# register theirs (tools/pyproject.toml); the product never imports them. It
# names the ones it documents, so an install without them says where they are.
TOOLS_GROUP = "booking_service.commands"
KNOWN_TOOLS = {
    "bench": "run the benchmark harness",
    "chaos": "run the fault-injection suite",
}


def _tools() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=TOOLS_GROUP)}


def _tools_missing(command: str) -> int:
    print(
        f"booking-service {command}: the tools are not installed;"
        " from a checkout: pip install ./tools (./scripts/test installs them)",
        file=sys.stderr,
    )
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1]:
        # A tool parses its own flags (booking-service bench --help).
        tool = _tools().get(argv[0])
        if tool is not None:
            return int(tool.load()(argv[1:]))
        if argv[0] in KNOWN_TOOLS:
            return _tools_missing(argv[0])
    args = build_parser().parse_args(argv)
    try:
        config = from_sources(args)
    except ConfigError as exc:
        print(f"booking-service: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_json)
    if args.command == "serve":
        if config.workers > 1 and not args.worker_process:
            return _run(lambda: _serve_workers(config, list(argv)))
        return _run(lambda: _serve(config))
    if args.command == "migrate":
        return _run(
            lambda: _migrate(config, args.action, args.count, args.contract, args.batch_size)
        )
    if args.command == "create-admin":
        try:
            password = _read_password(args.password_stdin)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        return _run(lambda: _create_admin(config, args.email, password))
    if args.command == "policy-defaults":
        values = {n: getattr(args, n) for n in POLICY_FIELDS if getattr(args, n) is not None}
        if any(v < 0 for v in values.values()):
            print("booking-service: policy limits must not be negative", file=sys.stderr)
            return 2
        return _run(lambda: _policy_defaults(config, values))
    return 2


if __name__ == "__main__":
    sys.exit(main())
