"""One chaos run: start the cluster, run the workload, the consumers and
the faults together, let everything settle, check, report."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import db as bench_db
from booking.v1 import appointment_pb2 as apb
from booking.v1 import slot_pb2
from chaos import checks
from chaos.checks import Violation
from chaos.cluster import Cluster, ReplicaSettings
from chaos.consumers import Consumer, Pager
from chaos.faults import KINDS, FaultRecord, Injector
from chaos.history import History
from chaos.observer import StandbyObserver
from chaos.patroni import PatroniChaosCluster
from chaos.readers import Reader
from chaos.report import render, summarize
from chaos.workload import Client, Replicas, RetryPolicy, Sender, World, login, seed, status_name

CATCH_UP_SECONDS = 60.0
IDLE_CATCH_UP_SECONDS = 8.0


@dataclass
class Options:
    duration: float | None = None
    operations: int | None = None
    replicas: int = 2
    clients: int = 12
    users: int | None = None
    seed: int | None = None
    faults: list[str] = field(default_factory=lambda: list(KINDS))
    faults_min: int | None = None
    fault_interval: float = 4.0
    sigstop_seconds: float = 3.0
    duplicate_rate: float = 0.1
    specialists: int = 3
    future_slots: int | None = None
    past_slots: int | None = None
    consumers_per_replica: int = 1
    hold_ttl_seconds: float = 20.0
    deadline: float = 2.0
    out: Path | None = None
    work_dir: Path | None = None
    keep: bool = False
    # "patroni": a Patroni cluster instead of one PostgreSQL (chaos.patroni).
    cluster: str | None = None
    haproxy: bool = False
    hang_seconds: float = 25.0
    # Cluster mode: the replicas read and stream events from the standbys.
    standby_reads: bool = True
    # Readers with tokens (chaos.readers); default 2 with standby reads, else 0.
    readers: int | None = None

    @property
    def standby_reading(self) -> bool:
        return self.cluster == "patroni" and self.standby_reads

    def resolved(self) -> Options:
        if self.duration is None and self.operations is None:
            self.duration = 60.0
        if self.seed is None:
            self.seed = random.randrange(1_000_000)
        if self.users is None:
            # Fewer users than clients: some users race themselves.
            self.users = max(1, (self.clients * 2) // 3)
        if self.faults_min is None:
            self.faults_min = len(self.faults)
        if self.readers is None:
            self.readers = 2 if self.standby_reading else 0
        # Confirmed and NO_SHOW appointments keep their slots for good: long
        # runs get more slots so holds keep succeeding.
        if self.future_slots is None:
            self.future_slots = max(16, (self.operations or 0) // 2000)
        if self.past_slots is None:
            self.past_slots = max(8, (self.operations or 0) // 2000)
        return self


_STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)


def run(opts: Options) -> tuple[int, dict[str, Any]]:
    """Returns the exit code (1 on any violation) and the summary."""
    opts.resolved()
    work_dir = opts.work_dir or Path(tempfile.mkdtemp(prefix="booking-chaos-"))
    settings = ReplicaSettings(hold_ttl_seconds=opts.hold_ttl_seconds)
    cluster: Cluster | PatroniChaosCluster
    if opts.cluster == "patroni":
        cluster = PatroniChaosCluster(
            work_dir,
            opts.replicas,
            settings,
            haproxy=opts.haproxy,
            hang_seconds=opts.hang_seconds,
            standby_reads=opts.standby_reads,
        )
    else:
        cluster = Cluster(work_dir, opts.replicas, settings)
    started = time.monotonic()
    try:
        say(f"chaos: starting PostgreSQL and {opts.replicas} replicas in {work_dir}")
        cluster.start()
        say(f"chaos: started in {time.monotonic() - started:.1f}s")
        summary = asyncio.run(_run(cluster, opts))
    finally:
        keep = opts.keep or opts.work_dir is not None
        cluster.close(keep_database=keep)
        if keep:
            say(
                f"chaos: logs and data kept in {work_dir}"
                + (f" (database {cluster.database_name})" if cluster.database_name else "")
            )
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    summary["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    if isinstance(cluster, PatroniChaosCluster):
        summary["meta"]["cluster"] = "patroni" + (" via haproxy" if opts.haproxy else "")
        summary["meta"]["leader_changes"] = cluster.leader_changes
        stats = cluster.leader_writes_stats
        summary["meta"]["rewinds"] = stats.rewinds
        summary["meta"]["lost_tail_commits_in_flight"] = stats.lost_in_flight
        summary["meta"]["lost_tail_commits_after_promotion"] = stats.after_promotion
        summary["meta"]["lost_tail_maintenance_after_promotion"] = stats.maintenance_after_promotion
        summary["meta"]["lost_tail_frozen_mid_commit"] = stats.frozen_mid_commit
        say(
            f"chaos: {stats.rewinds} rewinds witnessed; commits on lost tails: "
            f"{stats.lost_in_flight} by the leader in flight, "
            f"{stats.after_promotion} after another node was promoted "
            f"(and {stats.maintenance_after_promotion} autovacuum/autoanalyze ones, "
            f"{stats.frozen_mid_commit} begun before it, frozen mid-commit)"
        )
        say(f"chaos: Patroni cluster, {cluster.leader_changes} leader changes")
    print(render(summary), flush=True)
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return (1 if summary["total_violations"] else 0), summary


async def _run(cluster: Cluster | PatroniChaosCluster, opts: Options) -> dict[str, Any]:
    assert opts.seed is not None and opts.users is not None
    assert opts.future_slots is not None and opts.past_slots is not None
    assert opts.readers is not None
    rng = random.Random(opts.seed)
    world = await seed(
        cluster.url,
        users=opts.users,
        specialists=opts.specialists,
        future_slots=opts.future_slots,
        past_slots=opts.past_slots,
        readers=opts.readers,
    )
    replicas = Replicas(cluster.targets)
    history = History()
    readers: list[Reader] = []
    try:
        await login(replicas, world)
        policy = RetryPolicy(deadline=opts.deadline)
        stop_work = asyncio.Event()
        stop_consumers = asyncio.Event()

        n = len(replicas)
        consumers = [
            Consumer(f"all-{i}@replica-{i % n}", i % n, replicas, world.operator)
            for i in range(n * opts.consumers_per_replica)
        ]
        # A filtered consumer is idle most of the time, so it resumes from
        # heartbeat cursors rather than event cursors: the riskier position
        # to resume from after a crash.
        consumers += [
            Consumer(f"probe-{i}@replica-{i}", i, replicas, world.operator, world.probe_specialist)
            for i in range(n)
        ]
        pagers: list[Pager] = []
        observer: StandbyObserver | None = None
        observer_task: asyncio.Task[None] | None = None
        if isinstance(cluster, PatroniChaosCluster):
            # Standby consumers: with standby reads every replica serves its
            # streams from the standbys (the observer shows it; without, it
            # sees none); a pager of ListAppointmentEvents per replica too.
            pagers = [Pager(f"list-{i}@replica-{i}", i, replicas, world.operator) for i in range(n)]
            observer = StandbyObserver(
                {node.name: cluster.pc.node_url(node) for node in cluster.pc.nodes},
                cluster.database_name,
            )
            observer_task = asyncio.create_task(
                observer.run(
                    stop_consumers,
                    lambda: cluster.processes(),
                )
            )
        history.consumers = [c.log for c in consumers] + [p.log for p in pagers]
        consumer_tasks = [asyncio.create_task(c.run(stop_consumers)) for c in consumers]
        consumer_tasks += [asyncio.create_task(p.run(stop_consumers)) for p in pagers]
        if observer_task is not None:
            consumer_tasks.append(observer_task)
        readers = [
            Reader(
                f"reader-{i}",
                seat,
                world.reader_slots[i :: len(world.readers)],
                world.reader_specialist,
                cluster.targets,
                history,
                random.Random(rng.random()),
                policy,
            )
            for i, seat in enumerate(world.readers)
        ]

        clients = [
            Client(
                f"client-{i}",
                world.seats[i % len(world.seats)],
                world,
                Sender(replicas, history, random.Random(rng.random()), policy),
                random.Random(rng.random()),
                opts.duplicate_rate,
            )
            for i in range(opts.clients)
        ]
        clients.append(
            Client(
                "operator",
                world.operator,
                world,
                Sender(replicas, history, random.Random(rng.random()), policy),
                random.Random(rng.random()),
                opts.duplicate_rate,
            )
        )
        injector = Injector(
            cluster,
            replicas,
            world,
            Sender(replicas, history, random.Random(rng.random()), RetryPolicy(attempts=40)),
            random.Random(rng.random()),
            list(opts.faults),
            sigstop_seconds=opts.sigstop_seconds,
        )
        say(
            f"chaos: {len(clients)} clients, {len(readers)} readers, {len(consumers)} consumers"
            + (f" and {len(pagers)} pagers" if pagers else "")
            + (" (streams and reads from the standbys)" if opts.standby_reading else "")
            + f", faults {', '.join(opts.faults)}; seed {opts.seed}"
        )
        t0 = time.monotonic()
        client_tasks = [asyncio.create_task(c.run(stop_work)) for c in clients]
        client_tasks += [asyncio.create_task(r.run(stop_work)) for r in readers]
        fault_task = asyncio.create_task(_faults(injector, opts, stop_work, rng, t0))
        await _until_done(history, injector, opts, stop_work, t0)
        await asyncio.gather(*client_tasks)
        await fault_task
        say(f"chaos: workload stopped after {time.monotonic() - t0:.0f}s; settling")
        settling = time.monotonic()

        violations, background, read_stats = await _settle_and_check(
            cluster, replicas, world, history, injector.records, stop_consumers, consumer_tasks
        )
        say(f"chaos: settled and checked in {time.monotonic() - settling:.1f}s")
        meta = {
            "replicas": opts.replicas,
            "clients": opts.clients,
            "users": opts.users,
            "seed": opts.seed,
            "duration_option": opts.duration,
            "operations_option": opts.operations,
            "faults_min": opts.faults_min,
            "workload_seconds": round(time.monotonic() - t0, 1),
            "standby_reads": opts.standby_reading,
            "readers": opts.readers,
        }
        summary = summarize(history, injector.records, violations, meta)
        summary["background_tracebacks"] = [tb.brief() for tb in background]
        summary["readers"] = read_stats.to_json()
        if observer is not None:
            summary["standby_reads_observed"] = observer.summary()
        return summary
    finally:
        for reader in readers:
            await reader.close()
        await replicas.close()


async def _faults(
    injector: Injector, opts: Options, stop: asyncio.Event, rng: random.Random, t0: float
) -> None:
    if not opts.faults:
        return
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), opts.fault_interval * rng.uniform(0.5, 1.5))
            return
        except TimeoutError:
            pass
        if (
            opts.duration is not None
            and opts.operations is None
            and len(injector.records) >= (opts.faults_min or 0)
            and time.monotonic() - t0 > opts.duration - opts.fault_interval
        ):
            # Enough faults, and one started now would outlast the run's
            # time (a cluster fault waits for a healthy cluster first).
            return
        kind = injector.next_kind()
        rec = await injector.inject(kind)
        _say_fault(len(injector.records), rec)


def _say_fault(n: int, rec: FaultRecord) -> None:
    def fmt(v: float | None) -> str:
        return "never" if v is None else f"{v:.2f}s"

    say(
        f"chaos: fault {n} {rec.kind} {rec.detail} {rec.error}".rstrip()
        + f": SERVING after {fmt(rec.to_serving)}, first hold after {fmt(rec.to_first_hold)}"
    )


async def _until_done(
    history: History, injector: Injector, opts: Options, stop: asyncio.Event, t0: float
) -> None:
    assert opts.faults_min is not None
    wanted_faults = opts.faults_min if opts.faults else 0
    last_report = t0
    while True:
        await asyncio.sleep(0.5)
        now = time.monotonic()
        ops = len(history.requests)
        faults = len(injector.records)
        time_ok = opts.duration is None or now - t0 >= opts.duration
        ops_ok = opts.operations is None or ops >= opts.operations
        if time_ok and ops_ok and faults >= wanted_faults:
            stop.set()
            return
        if now - last_report >= 10:
            last_report = now
            say(f"chaos: {now - t0:5.0f}s  {ops:,} operations  {faults} faults")


async def _settle_and_check(
    cluster: Cluster | PatroniChaosCluster,
    replicas: Replicas,
    world: World,
    history: History,
    faults: list[FaultRecord],
    stop_consumers: asyncio.Event,
    consumer_tasks: list[asyncio.Task[None]],
) -> tuple[list[Violation], list[checks.Traceback], checks.ReadStats]:
    violations: list[Violation] = []
    for replica in cluster.replicas:
        if not replica.running:
            violations.append(
                Violation("recovered_after_fault", f"{replica.name} was not running at the end")
            )
            await asyncio.to_thread(cluster.restart_replica, replica)
    for f in faults:
        if f.error:
            violations.append(
                Violation("recovered_after_fault", f"{f.kind} could not be injected: {f.error}")
            )
        elif f.to_serving is None or f.to_first_hold is None:
            violations.append(
                Violation(
                    "recovered_after_fault",
                    f"{f.kind} {f.detail}: no recovery within the time allowed "
                    f"(SERVING {f.to_serving}, first hold {f.to_first_hold})",
                )
            )

    if isinstance(cluster, PatroniChaosCluster):
        # A fault just over may still be moving the leader (a hung node
        # resumed, being demoted): read the final state from the final leader.
        await asyncio.to_thread(cluster.prepare)
    # Let the consumers catch up with every event committed so far.
    conn = await bench_db.connect(cluster.url)
    try:
        settled = (await checks.fetch_state(conn)).events
        want = {log.name: set(checks.stream_of(log, settled)) for log in history.consumers}
        deadline = time.monotonic() + CATCH_UP_SECONDS
        progress, progressed = -1, time.monotonic()
        while time.monotonic() < deadline:
            if all(want[log.name] <= set(log.event_ids) for log in history.consumers):
                break
            # A consumer that skipped an event never catches up: stop
            # waiting once nothing arrives any more.
            received = sum(len(log.event_ids) for log in history.consumers)
            if received != progress:
                progress, progressed = received, time.monotonic()
            elif time.monotonic() - progressed > IDLE_CATCH_UP_SECONDS:
                break
            await asyncio.sleep(0.25)
        stop_consumers.set()
        await asyncio.gather(*consumer_tasks, return_exceptions=True)

        sql_before = await checks.fetch_state(conn)
        api_slots, api_appointments = await _api_view(replicas, world)
        state = await checks.fetch_state(conn)
        keys = [(r.caller_id, r.request_id) for r in history.transitions()]
        produced = await checks.request_events(conn, keys)
    finally:
        await conn.close()

    violations += checks.check_slots(state.slots, state.appointments, state.now)
    violations += checks.check_event_chains(state.events, state.appointments)
    violations += checks.check_requests(history.requests, produced)
    violations += checks.check_copies(history.requests)
    violations += checks.check_codes(history.requests, history.consumers, history.reads)
    read_violations, read_stats = checks.check_token_reads(history.reads, produced, state.events)
    violations += read_violations
    for log in history.consumers:
        violations += checks.check_consumer(
            log, checks.stream_of(log, state.events), want[log.name]
        )
    # Compare only what did not change while the API was being read.
    before_slots = {s.id: s.status for s in sql_before.slots}
    before_appts = {a.id: a.status for a in sql_before.appointments}
    violations += checks.check_api_agrees(
        {s.id: s.status for s in state.slots if before_slots.get(s.id) == s.status},
        api_slots,
        {a.id: a.status for a in state.appointments if before_appts.get(a.id) == a.status},
        api_appointments,
    )
    log_violations, background = checks.check_logs(cluster.log_paths())
    violations += log_violations
    if isinstance(cluster, PatroniChaosCluster):
        leader_violations, leader_writes = await asyncio.to_thread(cluster.leader_writes)
        violations += leader_violations
        cluster.leader_writes_stats = leader_writes
    return violations, background, read_stats


async def _api_view(replicas: Replicas, world: World) -> tuple[dict[str, str], dict[str, str]]:
    """Every slot (GetSlot) and appointment (ListAppointments) as the API reports them."""
    md = world.operator.metadata
    slots: dict[str, str] = {}
    for i, slot_id in enumerate([*world.all_slots(), *world.probe_slots, *world.reader_slots]):
        stubs = replicas.stubs[i % len(replicas)]
        reply = await _retrying(
            lambda s=stubs, sid=slot_id: s.slots.GetSlot(
                slot_pb2.GetSlotRequest(id=sid), metadata=md, timeout=10
            )
        )
        slots[slot_id] = slot_pb2.SlotStatus.Name(reply.slot.status).removeprefix("SLOT_STATUS_")
    appointments: dict[str, str] = {}
    for spec in [
        *world.specialists,
        world.probe_specialist,
        *filter(None, [world.reader_specialist]),
    ]:
        token = ""
        while True:
            stubs = replicas.stubs[len(appointments) % len(replicas)]
            page = await _retrying(
                lambda s=stubs, t=token, sp=spec: s.appointments.ListAppointments(
                    apb.ListAppointmentsRequest(specialist_id=sp, page_size=1000, page_token=t),
                    metadata=md,
                    timeout=30,
                )
            )
            for a in page.appointments:
                appointments[a.id] = status_name(a.status)
            token = page.next_page_token
            if not token:
                break
    return slots, appointments


async def _retrying(call: Any) -> Any:
    for attempt in range(20):
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code().name not in ("UNAVAILABLE", "DEADLINE_EXCEEDED") or attempt == 19:
                raise
            await asyncio.sleep(0.25)
    raise AssertionError("unreachable")
