"""Profiles as evidence (`--profile`): py-spy samples of the server
processes and the database's own statistics during chosen runs.

For each profiled run it writes, under the results directory's
``profiles/<time>/``:

- ``<figure>.<server>.raw.txt``: py-spy's collapsed stacks (one line per
  distinct stack with its sample count; flamegraph.pl, speedscope and
  inferno read it);
- ``<figure>.md``: the top frames by own samples and by samples anywhere
  in the stack, and the SQL side per call: from pg_stat_statements when
  the server has it loaded, else from pg_stat_user_functions (the bench
  turns ``track_functions = all`` on for its scratch databases with
  --profile), which times each SQL function the transitions call.
"""

from __future__ import annotations

import asyncio
import fnmatch
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

TOP = 25


def py_spy() -> str | None:
    """py-spy next to this interpreter (the dev tools install it), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def selected(key: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


# -- py-spy ---------------------------------------------------------------------------


def summarize_stacks(
    text: str, top: int = TOP
) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, top frames by own samples, top frames by inclusive samples)
    from py-spy's raw format: ``frame;frame;...;leaf count`` per line."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = stack.split(";")
        # The first frame is the process/thread label py-spy adds.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return total, own.most_common(top), inclusive.most_common(top)


@dataclass
class _Spy:
    name: str
    path: Path
    proc: subprocess.Popen[bytes]


# -- the SQL side -----------------------------------------------------------------------

_STATEMENTS = (
    "SELECT queryid::text AS id, query AS what, calls::float8 AS calls,"
    " total_exec_time AS ms, shared_blks_hit + shared_blks_read AS blocks"
    " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
    " WHERE datname = current_database())"
)
_FUNCTIONS = (
    "SELECT funcid::text AS id, schemaname || '.' || funcname AS what, calls::float8 AS calls,"
    " self_time AS ms, total_time AS total_ms FROM pg_stat_user_functions"
)


async def _sql_snapshot(url: str) -> tuple[str, dict[str, dict[str, Any]]]:
    conn = await asyncpg.connect(url)
    try:
        try:
            rows = await conn.fetch(_STATEMENTS)
            source = "pg_stat_statements (total execution time; nested statements included)"
        except asyncpg.PostgresError:
            rows = await conn.fetch(_FUNCTIONS)
            source = (
                "pg_stat_user_functions (self time of each SQL function;"
                " pg_stat_statements is not loaded on this server)"
            )
    finally:
        await conn.close()
    return source, {str(r["id"]): dict(r) for r in rows}


def _sql_delta(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    out = []
    for key, row in after.items():
        old = before.get(key, {})
        calls = float(row["calls"]) - float(old.get("calls", 0.0))
        ms = float(row["ms"]) - float(old.get("ms", 0.0))
        if calls <= 0 and ms <= 0:
            continue
        delta: dict[str, Any] = {
            "what": " ".join(str(row["what"]).split())[:300],
            "calls": calls,
            "ms": ms,
        }
        if "blocks" in row:
            delta["blocks"] = float(row["blocks"]) - float(old.get("blocks", 0.0))
        if "total_ms" in row:
            delta["total_ms"] = float(row["total_ms"]) - float(old.get("total_ms", 0.0))
        out.append(delta)
    out.sort(key=lambda d: -float(d["ms"]))
    return out


def enable_function_timing(url: str, database: str) -> bool:
    """track_functions = all for new sessions on `database` (superuser only)."""

    async def go() -> bool:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"ALTER DATABASE \"{database}\" SET track_functions = 'all'")
            return True
        except asyncpg.PostgresError:
            return False
        finally:
            await conn.close()

    return asyncio.run(go())


@dataclass
class Profiler:
    """Records one run at a time: start() before the load, stop() after."""

    out_dir: Path
    patterns: list[str]
    rate: int = 200
    native: bool = False
    written: list[Path] = field(default_factory=list)
    summaries: dict[str, str] = field(default_factory=dict)
    _spies: list[_Spy] = field(default_factory=list)
    _sql_before: dict[str, dict[str, Any]] = field(default_factory=dict)
    _key: str = ""
    _url: str = ""
    _missing_noted: bool = False

    def wants(self, key: str) -> bool:
        return selected(key, self.patterns)

    def start(self, key: str, servers: dict[str, int], url: str) -> str | None:
        """Start sampling `servers` (name -> pid); returns a note if py-spy is missing."""
        self._key, self._url = key, url
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _, self._sql_before = asyncio.run(_sql_snapshot(url))
        binary = py_spy()
        note = None
        if binary is None:
            note = "py-spy not found: profiles have the SQL side only"
        else:
            for name, pid in servers.items():
                path = self.out_dir / f"{key}.{name}.raw.txt"
                cmd = [
                    binary, "record", "--pid", str(pid), "--rate", str(self.rate),
                    "--format", "raw", "--nolineno", "--subprocesses", "--output", str(path),
                ]  # fmt: skip
                # Native frames name the C code under the event loop (grpc's
                # core, uvloop, syscalls), but py-spy must pause the process
                # for each sample, and a thread blocked in epoll counts too.
                cmd += ["--native"] if self.native else ["--nonblocking"]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                self._spies.append(_Spy(name, path, proc))
            time.sleep(0.3)  # py-spy attaches before the load starts
        return note

    def stop(self, calls: int) -> Path:
        """Stop sampling and write the run's summary; `calls` answered in the run."""
        problems = []
        for spy in self._spies:
            spy.proc.send_signal(signal.SIGINT)
            try:
                _, err = spy.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.proc.kill()
                _, err = spy.proc.communicate()
            if not spy.path.exists():
                problems.append(f"py-spy on {spy.name}: {err.decode(errors='replace')[-300:]}")
        # Backends report function statistics at most once a second.
        time.sleep(1.5)
        source, after = asyncio.run(_sql_snapshot(self._url))
        sql = _sql_delta(self._sql_before, after)
        text = self._markdown(calls, source, sql, problems)
        path = self.out_dir / f"{self._key}.md"
        path.write_text(text)
        self.written.append(path)
        self.summaries[self._key] = text
        self._spies = []
        return path

    def abort(self) -> None:
        for spy in self._spies:
            spy.proc.kill()
            spy.proc.wait()
        self._spies = []

    def _markdown(
        self, calls: int, source: str, sql: list[dict[str, Any]], problems: list[str]
    ) -> str:
        out = [f"# Profile: {self._key}", "", f"{calls:,} calls answered in the run.", ""]
        for spy in self._spies:
            if not spy.path.exists():
                continue
            total, own, inclusive = summarize_stacks(spy.path.read_text(errors="replace"))
            out += [
                f"## {spy.name}: py-spy, {total:,} samples at {self.rate}/s"
                f" (stacks: {spy.path.name})",
                "",
                "Own samples (where the CPU was):",
                "",
                "| share | samples | frame |",
                "| --- | --- | --- |",
            ]
            out += [f"| {n / total:.1%} | {n:,} | `{f}` |" for f, n in own] if total else []
            out += [
                "",
                "Inclusive (the frame anywhere on the stack):",
                "",
                "| share | samples | frame |",
                "| --- | --- | --- |",
            ]
            out += [f"| {n / total:.1%} | {n:,} | `{f}` |" for f, n in inclusive] if total else []
            out.append("")
        # Function statistics reach the server late (an idle backend may
        # hold them for seconds): per call is per call of the most-called
        # function, the entry point, which those statistics did count.
        per_calls = calls
        if sql and "blocks" not in sql[0]:
            per_calls = int(max(d["calls"] for d in sql)) or calls
        out += [
            f"## SQL: {source}",
            "",
            f"Per call: divided by {per_calls:,} calls.",
            "",
            "| ms per call | executions per call | total ms | what |",
            "| --- | --- | --- | --- |",
        ]
        for d in sql[:TOP]:
            per = d["ms"] / per_calls if per_calls else 0.0
            out.append(
                f"| {per:.4f} | {d['calls'] / per_calls if per_calls else 0:.2f}"
                f" | {d['ms']:,.1f} | `{str(d['what']).replace('|', '/')}` |"
            )
        if problems:
            out += ["", "Problems:", ""] + [f"- {p}" for p in problems]
        return "\n".join(out) + "\n"
