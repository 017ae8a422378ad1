"""What every scenario works with: options, the database, the servers, the
client processes, progress output, and the measurement of one run."""

from __future__ import annotations

import asyncio
import resource
import sys
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from bench import db
from bench import profile as profiling
from bench.load import Job, WorkerPool, latencies_of
from bench.procs import CpuMeter, ServerProcess
from bench.report import Figure
from bench.stats import latency_ms
from booking.v1 import appointment_pb2, appointment_pb2_grpc, auth_pb2, auth_pb2_grpc


@dataclass
class Options:
    duration: float
    repeats: int
    scenarios: list[str]
    quick: bool
    slots_rows: int
    concurrency: list[int]
    pair_concurrency: list[int]
    echo_concurrency: list[int]
    ceiling_clients: list[int]
    client_procs: int
    rounds: int
    contenders: int
    event_rate: float
    event_streams: list[int]
    idle_streams: int
    read_concurrency: list[int]
    series_concurrency: list[int]
    replica_concurrency: int
    database_url: str | None
    unsafe_fast: bool
    server_log_level: str
    server_env: dict[str, str]
    results_dir: Path
    data_dir: Path
    keep_data: bool
    pgbench: bool
    pool_size: int
    history_rows: int = 0
    history_concurrency: list[int] = field(default_factory=lambda: [16])
    history_backfill: bool = False
    # --profile: figure-key patterns whose runs are profiled (empty: none).
    profile: list[str] = field(default_factory=list)
    profile_native: bool = False
    # git revision of the previous release for the events scenario ("": none).
    previous_release: str = ""


class Progress:
    """Progress on stderr: a live line on a terminal, one line per run otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._live = False

    def _clear(self) -> None:
        if self._live:
            self.stream.write("\r\033[K")
            self._live = False

    def info(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream, flush=True)

    def live(self, text: str) -> None:
        if not self.tty:
            return
        self.stream.write("\r\033[K" + text[:150])
        self.stream.flush()
        self._live = True

    def run_ticker(self, label: str, duration: float) -> Callable[[float, int], None]:
        def tick(elapsed: float, calls: int) -> None:
            rate = calls / elapsed if elapsed > 0 else 0.0
            self.live(
                f"  {label}  {min(elapsed, duration):4.1f}/{duration:.1f}s"
                f"  {calls:,} done  ({rate:,.0f}/s)"
            )

        return tick


@dataclass
class Run:
    """The merged outcome of one run across client processes."""

    results: list[dict[str, Any]]
    cpu: dict[str, float | None]
    calls: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    latencies: array[float] = field(default_factory=lambda: array("d"))
    wall: float = 0.0
    client_cpu: float = 0.0
    exhausted: bool = False
    dropped: int = 0
    postgres_by: dict[str, float] = field(default_factory=dict)

    @classmethod
    def merge(cls, results: list[dict[str, Any]], cpu: dict[str, float | None]) -> Run:
        run = cls(results, cpu)
        starts, ends = [], []
        for r in results:
            run.calls += int(r.get("calls", 0))
            run.codes.update(r.get("codes", {}))
            run.latencies.extend(latencies_of(r))
            run.client_cpu += float(r.get("client_cpu_seconds", 0.0))
            run.exhausted |= bool(r.get("exhausted"))
            run.dropped += int(r.get("dropped", 0))
            if "start" in r:
                starts.append(float(r["start"]))
                ends.append(float(r["end"]))
        if starts:
            run.wall = max(ends) - min(starts)
        return run

    def per_call_us(self, seconds: float | None, calls: int | None = None) -> float | None:
        n = self.calls if calls is None else calls
        if seconds is None or n == 0:
            return None
        return seconds / n * 1e6

    def sample(self) -> dict[str, Any]:
        ok = self.codes.get("OK", 0)
        out: dict[str, Any] = {
            "throughput": ok / self.wall if self.wall > 0 else None,
            **latency_ms(self.latencies),
            "server_cpu_us": self.per_call_us(self.cpu.get("server")),
            "pg_cpu_us": self.per_call_us(self.cpu.get("postgres")),
            "client_cpu_us": self.per_call_us(self.client_cpu),
            "calls": self.calls,
            "ok": ok,
            "wall_seconds": self.wall,
            "codes": dict(self.codes),
            "cpu_seconds": {k: v for k, v in self.cpu.items()},
            "client_cpu_seconds": self.client_cpu,
        }
        if self.postgres_by and self.calls:
            out["pg_cpu_us_by_process"] = {
                k: round(v / self.calls * 1e6, 1)
                for k, v in sorted(self.postgres_by.items(), key=lambda kv: -kv[1])
            }
        if self.exhausted:
            out["exhausted"] = True
        if self.dropped:
            out["dropped"] = self.dropped
        return out


def split(total: int, workers: int) -> list[int]:
    """`total` callers over at most `workers` processes, none empty."""
    n = max(1, min(total, workers))
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


class Bench:
    def __init__(
        self,
        opts: Options,
        database: db.BenchDatabase,
        seeded: db.Seeded,
        pool: WorkerPool,
        postmaster: int | None,
        run_dir: Path,
        progress: Progress,
    ) -> None:
        self.opts = opts
        self.db = database
        self.seeded = seeded
        self.pool = pool
        self.postmaster = postmaster
        self.run_dir = run_dir
        self.progress = progress
        self.primary: ServerProcess | None = None
        self.secondary: ServerProcess | None = None
        self.echo: ServerProcess | None = None
        self.token = ""
        self.figures: dict[str, Figure] = {}
        self.notes: list[str] = []
        self.checks: dict[str, Any] = {}
        self.reads: db.ReadsData | None = None
        self.search: db.SearchData | None = None
        self.rep = 0
        # Set by the history scenario's preparation (bench.scenarios).
        self.history: Any = None
        # The previous release's source tree, for the events scenario's
        # comparison (bench.harness extracts it); None: no comparison.
        self.previous_release: Path | None = None
        # Set by the standby scenario's preparation (bench.scenarios).
        self.standby: Any = None
        # Set by the standby-reads scenario's preparation (bench.standby_reads).
        self.standby_reads: Any = None
        # Run at the end, before the main scratch database is dropped.
        self.cleanups: list[Callable[[], None]] = []
        # Markdown sections for the results file (profiles, query plans).
        self.appendix: list[str] = []
        self.profiler: profiling.Profiler | None = None
        self._current_figure = ""

    # -- servers ------------------------------------------------------------------

    def _server_env(self) -> dict[str, str]:
        return {"BOOKING_LOG_LEVEL": self.opts.server_log_level, **self.opts.server_env}

    def ensure_primary(self) -> ServerProcess:
        if self.primary is None or not self.primary.running:
            self.primary = ServerProcess.booking(
                "server-a", self.db.url, self.run_dir / "logs" / "server-a.log", self._server_env()
            )
            self.primary.start()
            if not self.token:
                self.token = self.login(self.primary)
        return self.primary

    def stop_primary(self) -> None:
        if self.primary is not None:
            self.primary.stop()

    def start_secondary(self) -> ServerProcess:
        if self.secondary is None or not self.secondary.running:
            self.secondary = ServerProcess.booking(
                "server-b", self.db.url, self.run_dir / "logs" / "server-b.log", self._server_env()
            )
            self.secondary.start()
        return self.secondary

    def stop_secondary(self) -> None:
        if self.secondary is not None:
            self.secondary.stop()

    def ensure_echo(self) -> ServerProcess:
        if self.echo is None or not self.echo.running:
            self.echo = ServerProcess.echo(self.run_dir / "logs" / "echo.log")
            self.echo.start()
        return self.echo

    def stop_servers(self) -> None:
        for server in (self.secondary, self.primary, self.echo):
            if server is not None:
                server.stop()

    def login(self, server: ServerProcess) -> str:
        with grpc.insecure_channel(server.target) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            reply = stub.Login(
                auth_pb2.LoginRequest(
                    email=self.seeded.operator_email, password=db.OPERATOR_PASSWORD
                ),
                timeout=30,
            )
        return str(reply.access_token)

    def hold_once(self, server: ServerProcess, k: int) -> None:
        """One HoldSlot from the harness itself (to prime event streams)."""
        with grpc.insecure_channel(server.target) as channel:
            stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
            stub.HoldSlot(
                appointment_pb2.HoldSlotRequest(
                    slot_id=str(db.pool_uuid(db.POOL_SLOT, k)),
                    user_id=str(db.pool_uuid(db.POOL_USER, k)),
                ),
                metadata=(("authorization", f"Bearer {self.token}"),),
                timeout=10,
            )

    # -- database -----------------------------------------------------------------

    def reset(self) -> None:
        asyncio.run(db.reset(self.db.url))

    # -- figures and runs ---------------------------------------------------------

    def figure(self, key: str, scenario: str, label: str, **kw: Any) -> Figure:
        if key not in self.figures:
            self.figures[key] = Figure(key=key, scenario=scenario, label=label, **kw)
        # The figure a scenario asks for is the one its next load() measures.
        self._current_figure = key
        return self.figures[key]

    def meter(self, servers: list[ServerProcess]) -> CpuMeter:
        def labels() -> dict[int, str]:
            return asyncio.run(db.backend_names(self.db.url))

        return CpuMeter([s.pid for s in servers], self.postmaster, self.pool.pids(), labels)

    def hold_jobs(
        self, concurrency: int, method: str, targets: list[ServerProcess], **kw: Any
    ) -> dict[int, Job]:
        """Closed-loop gRPC jobs over distinct pool slots, split over the
        client processes (targets are assigned round-robin)."""
        parts = split(concurrency, self.pool.size)
        per = self.seeded.pool_size // len(parts)
        return {
            i: Job(
                kind="grpc",
                concurrency=c,
                target=targets[i % len(targets)].target,
                token=self.token,
                method=method,
                first=i * per,
                count=per,
                seed=self.rep * 1000 + i,
                **kw,
            )
            for i, c in enumerate(parts)
        }

    def load(
        self,
        label: str,
        jobs: dict[int, Job],
        servers: list[ServerProcess],
        database_url: str | None = None,
    ) -> Run:
        """Run `jobs` for the configured duration, metering CPU of `servers`,
        PostgreSQL and the client processes; with --profile, sampled too
        when the current figure is one of those asked for."""
        meter = self.meter(servers)
        ticker = self.progress.run_ticker(label, self.opts.duration)
        key = self._current_figure
        profiler = self.profiler if self.profiler and self.profiler.wants(key) else None
        if profiler is not None:
            note = profiler.start(
                f"{key}.run{self.rep + 1}",
                {s.name: s.pid for s in servers},
                database_url or self.db.url,
            )
            if note and note not in self.notes:
                self.notes.append(note)
        try:
            results = self.pool.run(jobs, self.opts.duration, on_ready=meter.start, on_tick=ticker)
        except BaseException:
            if profiler is not None:
                profiler.abort()
            raise
        run = Run.merge(results, meter.stop())
        run.postgres_by = meter.postgres_by
        if profiler is not None:
            path = profiler.stop(run.codes.get("OK", 0) or run.calls)
            self.progress.info(f"  profile: {path}")
        return run

    def report_run(self, fig: Figure, sample: dict[str, Any]) -> None:
        fig.samples.append(sample | {"repeat": self.rep + 1})
        parts = []
        if sample.get("throughput") is not None:
            parts.append(f"{sample['throughput']:,.0f} {fig.throughput_unit}")
        for key, name in (("p50_ms", "p50"), ("p99_ms", "p99")):
            if sample.get(key) is not None:
                parts.append(f"{name} {sample[key]:.1f} ms")
        for key, name in (("server_cpu_us", "server"), ("pg_cpu_us", "PG")):
            if sample.get(key) is not None:
                parts.append(f"{name} {sample[key]:,.0f} us/call")
        for metric, name, unit in fig.extras:
            if sample.get(metric) is not None:
                parts.append(f"{name} {sample[metric]:,.1f}{unit}")
        bad = {c: n for c, n in (sample.get("codes") or {}).items() if c != "OK" and n}
        if bad:
            parts.append("answers " + ", ".join(f"{c} x{n}" for c, n in sorted(bad.items())))
        if sample.get("exhausted"):
            parts.append("RAN OUT OF POOL SLOTS")
        self.progress.info(
            f"  [{self.rep + 1}/{self.opts.repeats}] {fig.label}: " + "  ".join(parts)
        )


def rusage_children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
