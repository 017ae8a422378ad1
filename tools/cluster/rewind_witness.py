"""Run as Patroni's ``pg_rewind`` (``postgresql.bin_name.pg_rewind``): before
the real pg_rewind discards what this node wrote past the point where it
diverged from the new leader, keep that node's last commit records.

Usage: ``python rewind_witness.py REAL_PG_REWIND OUT_DIR <pg_rewind args>``.
It reads the data directory's pg_control (the node is stopped: Patroni
stops it before rewinding), dumps the Transaction records of the last WAL
segments of its timeline with pg_waldump (UTC timestamps) into
``OUT_DIR/rewind-<ns>.txt``, then execs the real pg_rewind with the same
arguments. Whatever goes wrong here is written to the file and the rewind
still runs: the witness never stands between Patroni and recovery.

This file is copied into each node's directory and run by the server user;
it imports nothing from the project.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

# How many segments before the last checkpoint's to dump: a demoted node's
# tail is a few megabytes at most, well inside this.
SEGMENTS_BEFORE = 16
SEGMENTS_AFTER = 16
# The tail past the divergence point is kept whole up to this many records.
TAIL_LINES = 200_000


def _segment_name(timeline: int, number: int, segment_size: int) -> str:
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{number // per_id:08X}{number % per_id:08X}"


def witness(real: str, out_dir: str, args: list[str]) -> None:
    data = args[args.index("-D") + 1]
    bin_dir = os.path.dirname(real)
    out = os.path.join(out_dir, f"rewind-{time.time_ns()}.txt")
    os.makedirs(out_dir, exist_ok=True)
    env = {**os.environ, "LANG": "C", "LC_ALL": "C", "TZ": "UTC"}
    lines: list[str] = [f"# data {data}"]
    try:
        control = subprocess.run(
            [os.path.join(bin_dir, "pg_controldata"), "-D", data],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        ).stdout
        loc = re.search(r"Latest checkpoint location:\s+([0-9A-F]+)/([0-9A-F]+)", control)
        tli = re.search(r"Latest checkpoint's TimeLineID:\s+(\d+)", control)
        size = re.search(r"Bytes per WAL segment:\s+(\d+)", control)
        if not (loc and tli and size):
            raise RuntimeError("pg_controldata: no checkpoint location")
        timeline = int(tli.group(1))
        segment_size = int(size.group(1))
        end = (int(loc.group(1), 16) << 32) | int(loc.group(2), 16)
        wal = os.path.join(data, "pg_wal")
        last = end // segment_size
        first = last
        while first > 0 and last - first < SEGMENTS_BEFORE:
            if not os.path.exists(
                os.path.join(wal, _segment_name(timeline, first - 1, segment_size))
            ):
                break
            first -= 1
        while last - end // segment_size < SEGMENTS_AFTER and os.path.exists(
            os.path.join(wal, _segment_name(timeline, last + 1, segment_size))
        ):
            last += 1
        lines.append(f"# timeline {timeline}")
        lines.append(f"# checkpoint {end:X}")
        lines.append(f"# from {first * segment_size:X}")
        dump = subprocess.run(
            [
                os.path.join(bin_dir, "pg_waldump"),
                "-p",
                wal,
                "-r",
                "Transaction",
                _segment_name(timeline, first, segment_size),
                _segment_name(timeline, last, segment_size),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        lines.extend(dump.stdout.splitlines())
        lines.extend(f"# pg_waldump: {line}" for line in dump.stderr.splitlines())
        # For a post-mortem: every record past the divergence point (what
        # the rewind discards), as pg_rewind's dry run names it.
        dry = subprocess.run(
            [real, "--dry-run", *args], capture_output=True, text=True, env=env, timeout=120
        )
        lines.extend(f"# dry-run: {line}" for line in (dry.stdout + dry.stderr).splitlines())
        div = re.search(r"diverged at WAL location ([0-9A-F]+/[0-9A-F]+)", dry.stdout + dry.stderr)
        if div:
            tail = subprocess.run(
                [
                    os.path.join(bin_dir, "pg_waldump"),
                    "-p",
                    wal,
                    "-t",
                    str(timeline),
                    "-s",
                    div.group(1),
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                check=False,
            )
            records = tail.stdout.splitlines()
            lines.extend(f"# tail: {line}" for line in records[:TAIL_LINES])
            lines.append(
                f"# tail-end {div.group(1)}" if len(records) <= TAIL_LINES else "# tail-cut"
            )
    except Exception as exc:  # noqa: BLE001 - recorded; the rewind must still run
        lines.append(f"# error {exc!r}")
    with open(out, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main() -> None:
    real, out_dir, *args = sys.argv[1:]
    try:
        # Patroni also runs `pg_rewind --help` to see whether it can rewind.
        if "-D" in args:
            witness(real, out_dir, args)
    finally:
        os.execv(real, [real, *args])


if __name__ == "__main__":
    main()
