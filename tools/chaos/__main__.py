"""``booking-service chaos`` (or ``python -m chaos``): command-line flags."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from chaos.faults import KINDS
from chaos.patroni import KINDS as CLUSTER_MODE_KINDS
from chaos.run import Options, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="booking-service chaos",
        description=(
            "Start PostgreSQL and server replicas, run a randomized concurrent workload and "
            "event consumers while injecting faults, then check the invariants. Exit code 1 "
            "on any violation."
        ),
    )
    p.add_argument(
        "--duration",
        type=float,
        help="seconds of workload (default 60 when --operations is not given either)",
    )
    p.add_argument("--operations", type=int, help="run until this many operations were sent")
    p.add_argument("--replicas", type=int, default=2, help="server replicas (default 2)")
    p.add_argument("--clients", type=int, default=12, help="concurrent clients (default 12)")
    p.add_argument(
        "--users",
        type=int,
        help="client users (default 2/3 of --clients, so some users are shared by several clients)",
    )
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument(
        "--faults",
        default=None,
        help=f"comma-separated fault kinds, or 'none' (default: all: {','.join(KINDS)})",
    )
    p.add_argument(
        "--faults-min",
        type=int,
        help="keep running until at least this many "
        "faults were injected (default: one of each kind)",
    )
    p.add_argument(
        "--fault-interval", type=float, default=4.0, help="mean seconds between faults (default 4)"
    )
    p.add_argument(
        "--sigstop-seconds",
        type=float,
        default=3.0,
        help="how long pg_sigstop freezes PostgreSQL (default 3)",
    )
    p.add_argument(
        "--duplicate-rate",
        type=float,
        default=0.1,
        help="share of requests sent as two simultaneous copies (default 0.1)",
    )
    p.add_argument(
        "--hold-ttl",
        type=float,
        default=20.0,
        help="the replicas' hold TTL in seconds (default 20)",
    )
    p.add_argument(
        "--cluster",
        choices=["patroni"],
        help="run against a Patroni cluster (etcd + three PostgreSQL nodes, synchronous"
        " mode; installs Patroni, etcd and HAProxy when missing); its fault kinds are"
        f" {','.join(CLUSTER_MODE_KINDS)}",
    )
    p.add_argument(
        "--haproxy",
        action="store_true",
        help="with --cluster: the replicas connect through HAProxy instead of a multi-host URL",
    )
    p.add_argument(
        "--hang-seconds",
        type=float,
        default=25.0,
        help="with --cluster: how long primary_hang, node_hang and etcd_loss last"
        " (default 25, longer than Patroni's 20 s TTL)",
    )
    p.add_argument(
        "--no-standby-reads",
        action="store_true",
        help="with --cluster: the replicas read and stream from the primary only (by default"
        " they read from the standbys: --read-database-url naming every node, or HAProxy's"
        " replicas front with --haproxy)",
    )
    p.add_argument(
        "--readers",
        type=int,
        help="readers that write and read their write back through another replica with"
        " consistency tokens (default 2 with standby reads, else 0)",
    )
    p.add_argument("--out", type=Path, help="write the summary as JSON here")
    p.add_argument(
        "--work-dir",
        type=Path,
        help="PostgreSQL data and replica logs "
        "(default: a temporary directory, removed at the end unless --keep)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    known = CLUSTER_MODE_KINDS if args.cluster else KINDS
    faults = ",".join(known) if args.faults is None else args.faults
    kinds = [] if faults in ("", "none") else [k.strip() for k in faults.split(",")]
    unknown = [k for k in kinds if k not in known]
    if unknown:
        print(f"unknown fault kinds: {', '.join(unknown)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so the cluster is stopped and a frozen
    # PostgreSQL resumed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    opts = Options(
        duration=args.duration,
        operations=args.operations,
        replicas=args.replicas,
        clients=args.clients,
        users=args.users,
        seed=args.seed,
        faults=kinds,
        faults_min=args.faults_min,
        fault_interval=args.fault_interval,
        sigstop_seconds=args.sigstop_seconds,
        duplicate_rate=args.duplicate_rate,
        hold_ttl_seconds=args.hold_ttl,
        out=args.out,
        work_dir=args.work_dir,
        keep=args.keep,
        cluster=args.cluster,
        haproxy=args.haproxy,
        hang_seconds=args.hang_seconds,
        standby_reads=not args.no_standby_reads,
        readers=args.readers,
    )
    code, _ = run(opts)
    return code


if __name__ == "__main__":
    sys.exit(main())
