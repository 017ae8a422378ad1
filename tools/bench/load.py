"""Load generators: persistent client processes that run jobs.

The harness starts a few worker processes once (multiprocessing, spawn) and
sends each of them jobs over a pipe. A job runs in the worker's own event
loop (uvloop when available), away from the server and the harness:

    harness -> worker: ("job", Job)      worker connects, opens channels...
    worker -> harness: ("ready", None)
    harness -> worker: ("go", deadline)  deadline on the shared monotonic clock
    worker -> harness: ("result", dict) or ("error", traceback)

Every job is bounded: by its deadline, by its item range (each call uses a
distinct pool slot), by the per-call timeout, and by the harness's stop
event. A worker counts finished calls in a shared array so the harness can
show progress while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import random
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Barrier, Event
from typing import Any

CALL_TIMEOUT = 10.0
# gRPC channels with identical arguments share one connection; a distinct
# argument per channel gives each its own (so streams spread over several).
STREAMS_PER_CHANNEL = 100


@dataclass
class Job:
    """What one worker should do. Only the fields its kind uses matter."""

    kind: str  # grpc | asyncpg | contention | watch
    concurrency: int = 1
    target: str = ""  # host:port of the gRPC server
    token: str = ""
    # grpc: hold | hold_confirm | hold_series | health | floor | list_slots | search_slots
    method: str = "hold"
    first: int = 0  # first pool index this worker may use
    count: int = 0  # how many pool indices it may use
    rate: float = 0.0  # grpc: calls per second (paced, open loop); 0 = closed loop
    dsn: str = ""  # asyncpg
    sql: str = "function"  # asyncpg: function | seed
    actor_id: str = ""
    specialist_id: str = ""
    rounds: int = 0  # contention
    user_first: int = 0  # contention: first pool user of this worker's clients
    streams: int = 0  # watch
    # list_slots: specialists, days, day0; search_slots: service_types, days, hour0
    reads: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class WorkerHandle:
    index: int
    process: mp.process.BaseProcess
    conn: Connection
    stop: Event


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    """`size` client processes, started once, reused by every run."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.size = size
        self.counters: SynchronizedArray[int] = ctx.Array("q", size, lock=False)
        self.barrier: Barrier = ctx.Barrier(size)
        self.workers: list[WorkerHandle] = []
        for i in range(size):
            ours, theirs = ctx.Pipe()
            stop = ctx.Event()
            process = ctx.Process(
                target=worker_main,
                args=(i, theirs, self.counters, stop, self.barrier),
                name=f"bench-client-{i}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.workers.append(WorkerHandle(i, process, ours, stop))

    def pids(self) -> list[int]:
        return [w.process.pid or 0 for w in self.workers]

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                w.conn.send(("quit", None))
        for w in self.workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(timeout=5)
            w.conn.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        jobs: dict[int, Job],
        duration: float,
        *,
        on_ready: Callable[[], None] | None = None,
        on_tick: Callable[[float, int], None] | None = None,
        wait_ready: float = 60.0,
    ) -> list[dict[str, Any]]:
        """Run `jobs` (worker index -> job) together for `duration` seconds.

        on_ready runs once every worker is connected, just before "go"
        (the harness reads CPU counters there); on_tick(elapsed, calls)
        runs about every 0.25 s while the jobs run.
        """
        chosen = [self.workers[i] for i in jobs]
        for w in chosen:
            w.stop.clear()
            self.counters[w.index] = 0
            w.conn.send(("job", jobs[w.index]))
        for w in chosen:
            self._expect(w, "ready", wait_ready)
        if on_ready is not None:
            on_ready()
        start = time.monotonic()
        deadline = start + duration
        for w in chosen:
            w.conn.send(("go", deadline))
        results: dict[int, dict[str, Any]] = {}
        hard_limit = deadline + CALL_TIMEOUT + 20
        while len(results) < len(chosen):
            for w in chosen:
                if w.index in results:
                    continue
                if w.conn.poll(0):
                    results[w.index] = self._result(w)
            if len(results) == len(chosen):
                break
            now = time.monotonic()
            if now > hard_limit:
                self.stop_all()
                raise WorkerError("client workers did not finish in time")
            if on_tick is not None:
                on_tick(now - start, sum(self.counters[w.index] for w in chosen))
            waits = [w.conn for w in chosen if w.index not in results]
            mp.connection.wait(waits, timeout=0.25)
        return [results[w.index] for w in chosen]

    def start_jobs(self, jobs: dict[int, Job], wait_ready: float = 60.0) -> None:
        """The first half of run(): send jobs, wait until ready (for jobs the
        harness must prime before it says go)."""
        for i, job in jobs.items():
            w = self.workers[i]
            w.stop.clear()
            self.counters[i] = 0
            w.conn.send(("job", job))
        for i in jobs:
            self._expect(self.workers[i], "ready", wait_ready)

    def go(self, indices: list[int], deadline: float) -> None:
        for i in indices:
            self.workers[i].conn.send(("go", deadline))

    def collect(self, indices: list[int], timeout: float) -> list[dict[str, Any]]:
        out = []
        for i in indices:
            w = self.workers[i]
            if not w.conn.poll(timeout):
                self.stop_all()
                raise WorkerError(f"client worker {i} did not answer in time")
            out.append(self._result(w))
        return out

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop.set()

    def counted(self, indices: list[int]) -> int:
        return sum(self.counters[i] for i in indices)

    def _expect(self, w: WorkerHandle, what: str, timeout: float) -> Any:
        if not w.conn.poll(timeout):
            raise WorkerError(f"client worker {w.index} not {what} after {timeout:.0f}s")
        kind, payload = w.conn.recv()
        if kind == "error":
            raise WorkerError(f"client worker {w.index} failed:\n{payload}")
        if kind != what:
            raise WorkerError(f"client worker {w.index}: expected {what}, got {kind}")
        return payload

    def _result(self, w: WorkerHandle) -> dict[str, Any]:
        result: dict[str, Any] = self._expect(w, "result", 1)
        return result


# ---------------------------------------------------------------------------
# Inside a worker process.


def worker_main(
    index: int,
    conn: Connection,
    counters: SynchronizedArray[int],
    stop: Event,
    barrier: Barrier,
) -> None:
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "quit":
            return
        if kind != "job":
            continue
        worker = _Worker(index, conn, counters, stop, barrier, payload)
        try:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                result = runner.run(worker.run())
            conn.send(("result", result))
        except Exception:  # noqa: BLE001 - reported to the harness, which fails the run
            with contextlib.suppress(OSError):
                conn.send(("error", traceback.format_exc()))


class _Stats:
    def __init__(self) -> None:
        self.latencies = array("d")
        self.codes: Counter[str] = Counter()
        self.calls = 0
        self.last = 0.0

    def record(self, started: float, code: str) -> None:
        now = time.monotonic()
        self.latencies.append(now - started)
        self.codes[code] += 1
        self.calls += 1
        self.last = max(self.last, now)


class _Worker:
    def __init__(
        self,
        index: int,
        conn: Connection,
        counters: SynchronizedArray[int],
        stop: Event,
        barrier: Barrier,
        job: Job,
    ) -> None:
        self.index = index
        self.conn = conn
        self.counters = counters
        self.stop = stop
        self.barrier = barrier
        self.job = job
        self.stopped = False
        self.stopped_event = asyncio.Event()
        self.deadline = math.inf

    def tick(self) -> None:
        self.counters[self.index] += 1

    async def _wait_go(self) -> float:
        loop = asyncio.get_running_loop()
        self.conn.send(("ready", None))
        kind, deadline = await loop.run_in_executor(None, self.conn.recv)
        if kind != "go":
            raise RuntimeError(f"expected go, got {kind}")
        self.deadline = float(deadline)
        return self.deadline

    async def _watch_stop(self) -> None:
        """Poll the harness's stop event (a multiprocessing one)."""
        while not self.stop.is_set():  # noqa: ASYNC110 - not an asyncio event
            await asyncio.sleep(0.05)
        self.stopped = True
        self.stopped_event.set()

    async def _sleep_until_deadline(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.stopped_event.wait(), max(0.0, self.deadline - time.monotonic())
            )

    def running(self) -> bool:
        return not self.stopped and time.monotonic() < self.deadline

    async def run(self) -> dict[str, Any]:
        kinds: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
            "grpc": self._grpc,
            "asyncpg": self._asyncpg,
            "contention": self._contention,
            "watch": self._watch,
        }
        cpu0 = time.process_time()
        watcher = asyncio.create_task(self._watch_stop())
        try:
            result = await kinds[self.job.kind]()
        finally:
            self.stopped = True
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        result["client_cpu_seconds"] = time.process_time() - cpu0
        return result

    # -- closed or paced loops over pool items -------------------------------

    def _items(self) -> Iterator[int]:
        return iter(range(self.job.first, self.job.first + self.job.count))

    async def _drive(self, call: Callable[[int], Awaitable[str]]) -> dict[str, Any]:
        """Run `call(k)` for distinct pool items k until the deadline:
        closed loop with `concurrency` callers, or paced at `rate` per second."""
        stats = _Stats()
        items = self._items()
        exhausted = False

        async def one(k: int) -> None:
            started = time.monotonic()
            code = await call(k)
            stats.record(started, code)
            self.tick()

        async def caller() -> None:
            nonlocal exhausted
            while self.running():
                k = next(items, None)
                if k is None:
                    exhausted = True
                    return
                await one(k)

        await self._wait_go()
        start = time.monotonic()
        dropped = 0
        if self.job.rate > 0:
            pending: set[asyncio.Task[None]] = set()
            n = 0
            while self.running():
                due = start + n / self.job.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                k = next(items, None)
                if k is None:
                    exhausted = True
                    break
                if len(pending) < self.job.concurrency:
                    task = asyncio.create_task(one(k))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                else:
                    dropped += 1  # the server is not keeping up with the pace
                n += 1
            if pending:
                await asyncio.gather(*pending)
        else:
            await asyncio.gather(*(caller() for _ in range(self.job.concurrency)))
        result = _summary(stats, start, exhausted)
        result["dropped"] = dropped
        return result

    # -- gRPC ------------------------------------------------------------------

    async def _grpc(self) -> dict[str, Any]:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from bench.db import POOL_SLOT, POOL_USER, READ_SPECIALIST, pool_uuid
        from booking.v1 import appointment_pb2 as apb
        from booking.v1 import appointment_pb2_grpc, slot_pb2_grpc
        from booking.v1 import slot_pb2 as spb

        job = self.job
        md = (("authorization", f"Bearer {job.token}"),)
        async with grpc.aio.insecure_channel(job.target) as channel:
            await asyncio.wait_for(channel.channel_ready(), 15)
            appointments = appointment_pb2_grpc.AppointmentServiceStub(channel)
            slots = slot_pb2_grpc.SlotServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            rng = random.Random(job.seed)
            reads = job.reads

            async def hold(k: int) -> str:
                try:
                    await appointments.HoldSlot(
                        apb.HoldSlotRequest(
                            slot_id=str(pool_uuid(POOL_SLOT, k)),
                            user_id=str(pool_uuid(POOL_USER, k)),
                        ),
                        metadata=md,
                        timeout=CALL_TIMEOUT,
                    )
                except grpc.aio.AioRpcError as err:
                    return err.code().name
                return "OK"

            async def hold_confirm(k: int) -> str:
                try:
                    held = await appointments.HoldSlot(
                        apb.HoldSlotRequest(
                            slot_id=str(pool_uuid(POOL_SLOT, k)),
                            user_id=str(pool_uuid(POOL_USER, k)),
                        ),
                        metadata=md,
                        timeout=CALL_TIMEOUT,
                    )
                    await appointments.ConfirmAppointment(
                        apb.ConfirmAppointmentRequest(id=held.appointment.id),
                        metadata=md,
                        timeout=CALL_TIMEOUT,
                    )
                except grpc.aio.AioRpcError as err:
                    return err.code().name
                return "OK"

            async def check(k: int) -> str:
                try:
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as err:
                    return err.code().name
                return "OK"

            from bench.floor_server import METHOD as FLOOR_METHOD

            floor_call = channel.unary_unary(
                FLOOR_METHOD,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )

            async def floor(k: int) -> str:
                try:
                    await floor_call(
                        health_pb2.HealthCheckRequest(), metadata=md, timeout=CALL_TIMEOUT
                    )
                except grpc.aio.AioRpcError as err:
                    return err.code().name
                return "OK"

            async def list_day(k: int) -> str:
                specialist = rng.randrange(reads["specialists"])
                day = reads["day0"] + rng.randrange(reads["days"]) * 86400
                request = spb.ListSlotsRequest(
                    specialist_id=str(pool_uuid(READ_SPECIALIST, specialist))
                )
                request.window_start_time.FromSeconds(day)
                request.window_end_time.FromSeconds(day + 86400)
                try:
                    reply = await slots.ListSlots(request, metadata=md, timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as err:
                    return err.code().name
                return "OK" if reply.slots else "EMPTY"

            async def search_week(k: int) -> str:
                # A week of one service type, starting on a random loaded day.
                day = reads["hour0"] + rng.randrange(max(1, reads["days"] - 7)) * 86400
                request = spb.SearchAvailableSlotsRequest(
                    service_type=f"search-{rng.randrange(reads['service_types'])}"
                )
                request.window_start_time.FromSeconds(day)
                request.window_end_time.FromSeconds(day + 7 * 86400)
                try:
                    reply = await slots.SearchAvailableSlots(
                        request, metadata=md, timeout=CALL_TIMEOUT
                    )
                except grpc.aio.AioRpcError as err:
                    return err.code().name
                return "OK" if reply.available_slots else "EMPTY"

            async def hold_series(k: int) -> str:
                # Series k: ten daily occurrences of one time of day, on
                # pool slots no other series uses (bench.db.series_first).
                from bench.db import SERIES_OCCURRENCES, series_first

                try:
                    reply = await appointments.HoldSeries(
                        apb.HoldSeriesRequest(
                            first_slot_id=str(pool_uuid(POOL_SLOT, series_first(k))),
                            recurrence=f"FREQ=DAILY;COUNT={SERIES_OCCURRENCES}",
                            mode=apb.SERIES_MODE_ALL_OR_NOTHING,
                            user_id=str(pool_uuid(POOL_USER, k)),
                        ),
                        metadata=md,
                        timeout=CALL_TIMEOUT,
                    )
                except grpc.aio.AioRpcError as err:
                    return err.code().name
                return "OK" if reply.held else "NOT_HELD"

            calls: dict[str, Callable[[int], Awaitable[str]]] = {
                "hold": hold,
                "hold_confirm": hold_confirm,
                "hold_series": hold_series,
                "health": check,
                "floor": floor,
                "list_slots": list_day,
                "search_slots": search_week,
                **_history_reads(appointments, slots, md, rng, reads),
            }
            # One call first so connection set-up is not measured.
            if job.method not in ("hold", "hold_confirm", "hold_series"):
                await calls[job.method](job.first)
            return await self._drive(calls[job.method])

    # -- asyncpg (no gRPC) -----------------------------------------------------

    async def _asyncpg(self) -> dict[str, Any]:
        import asyncpg

        from bench.db import POOL_SLOT, POOL_USER, SESSION_SETTINGS, pool_uuid
        from storage.functions import HOLD_SLOT

        job = self.job
        function_sql = HOLD_SLOT.statement()
        ttl = timedelta(seconds=300)
        actor = job.actor_id
        specialist = job.specialist_id
        conns: asyncio.Queue[asyncpg.Connection] = asyncio.Queue()
        opened = await asyncio.gather(
            *(
                asyncpg.connect(job.dsn, server_settings=SESSION_SETTINGS)
                for _ in range(job.concurrency)
            )
        )
        for c in opened:
            conns.put_nowait(c)

        async def function(conn: asyncpg.Connection, k: int) -> None:
            await conn.fetchrow(
                function_sql,
                pool_uuid(POOL_SLOT, k),
                pool_uuid(POOL_USER, k),
                "NORMAL",
                actor,
                ttl,
                True,
                None,
                False,  # p_policy_exempt: a CLIENT's hold
                1,  # p_party_size
            )

        async def seed(conn: asyncpg.Connection, k: int) -> None:
            slot = pool_uuid(POOL_SLOT, k)
            async with conn.transaction():
                await conn.fetchrow(
                    "SELECT * FROM time_slots WHERE id = $1 AND status = 'AVAILABLE' FOR UPDATE",
                    slot,
                )
                await conn.execute("UPDATE time_slots SET status = 'HOLD' WHERE id = $1", slot)
                await conn.execute(
                    "INSERT INTO appointments"
                    " (id, user_id, specialist_id, time_slot_id, status, expires_at)"
                    " VALUES (gen_random_uuid(), $1, $2, $3, 'HOLD', now() + interval '5 minutes')",
                    pool_uuid(POOL_USER, k),
                    specialist,
                    slot,
                )

        run_sql = function if job.sql == "function" else seed

        async def call(k: int) -> str:
            conn = await conns.get()
            try:
                await run_sql(conn, k)
            except asyncpg.PostgresError as err:
                return f"SQLSTATE_{err.sqlstate}"
            finally:
                conns.put_nowait(conn)
            return "OK"

        try:
            return await self._drive(call)
        finally:
            await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)

    # -- contention: everyone holds the same slot --------------------------------

    async def _contention(self) -> dict[str, Any]:
        import grpc

        from bench.db import POOL_SLOT, POOL_USER, pool_uuid
        from booking.v1 import appointment_pb2 as apb
        from booking.v1 import appointment_pb2_grpc

        job = self.job
        md = (("authorization", f"Bearer {job.token}"),)
        loop = asyncio.get_running_loop()
        rounds: list[dict[str, Any]] = []
        async with grpc.aio.insecure_channel(job.target) as channel:
            await asyncio.wait_for(channel.channel_ready(), 15)
            stub = appointment_pb2_grpc.AppointmentServiceStub(channel)

            async def hold(slot: str, user: int) -> tuple[float, str, float]:
                try:
                    await stub.HoldSlot(
                        apb.HoldSlotRequest(slot_id=slot, user_id=str(pool_uuid(POOL_USER, user))),
                        metadata=md,
                        timeout=CALL_TIMEOUT,
                    )
                    code = "OK"
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                # Wall clock too: a refusal is compared with the winner's
                # commit timestamp, which PostgreSQL keeps on this clock.
                return time.monotonic(), code, time.time()

            await self._wait_go()
            # Bounded by the round count, not the deadline: every worker must
            # reach the same barriers.
            for r in range(job.rounds):
                if self.stopped:
                    break
                # Every worker's clients start the round together.
                await loop.run_in_executor(None, self.barrier.wait, 30.0)
                slot = str(pool_uuid(POOL_SLOT, job.first + r))
                started = time.monotonic()
                answers = await asyncio.gather(
                    *(hold(slot, job.user_first + c) for c in range(job.concurrency))
                )
                rounds.append(
                    {
                        "round": r,
                        "start": started,
                        "answers": [t for t, _, _ in answers],
                        "codes": [c for _, c, _ in answers],
                        "walls": [w for _, _, w in answers],
                    }
                )
                self.tick()
        return {"rounds": rounds}

    # -- event streams -------------------------------------------------------------

    async def _watch(self) -> dict[str, Any]:
        import grpc

        from booking.v1 import appointment_pb2 as apb
        from booking.v1 import appointment_pb2_grpc

        job = self.job
        md = (("authorization", f"Bearer {job.token}"),)
        recording = False
        latencies = array("d")
        received = Counter[str]()
        ended: Counter[str] = Counter()
        opened_by: Counter[str] = Counter()  # what each stream received first
        channels = []
        calls = []
        n_channels = max(1, -(-job.streams // STREAMS_PER_CHANNEL))
        for c in range(n_channels):
            channel = grpc.aio.insecure_channel(
                job.target, options=[("grpc.use_local_subchannel_pool", 1), ("bench.channel", c)]
            )
            channels.append(channel)
        try:
            await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 15) for ch in channels))

            async def reader(i: int) -> None:
                nonlocal recording
                stub = appointment_pb2_grpc.AppointmentServiceStub(channels[i % n_channels])
                call = stub.WatchAppointmentEvents(
                    apb.WatchAppointmentEventsRequest(start_position=apb.WATCH_START_POSITION_NOW),
                    metadata=md,
                )
                calls.append(call)
                first = True
                try:
                    async for message in call:
                        now = time.time()
                        if first:
                            first = False
                            opened_by[message.WhichOneof("kind") or "?"] += 1
                            self.tick()
                        if message.HasField("event"):
                            if recording:
                                created = message.event.create_time
                                latencies.append(now - (created.seconds + created.nanos / 1e9))
                                received["events"] += 1
                        elif recording:
                            received["heartbeats"] += 1
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.CANCELLED:
                        ended[err.code().name] += 1
                except asyncio.CancelledError:
                    pass

            readers = [asyncio.create_task(reader(i)) for i in range(job.streams)]
            await asyncio.sleep(0)
            await self._wait_go()
            recording = True
            start = time.monotonic()
            await self._sleep_until_deadline()
            recording = False
            end = time.monotonic()
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        finally:
            await asyncio.gather(*(ch.close(None) for ch in channels), return_exceptions=True)
        return {
            "latencies": latencies.tobytes(),
            "events": received["events"],
            "heartbeats": received["heartbeats"],
            "stream_errors": dict(ended),
            "first_message": dict(opened_by),
            "streams": job.streams,
            "start": start,
            "end": end,
        }


def _history_reads(
    appointments: Any,
    slots: Any,
    md: tuple[tuple[str, str], ...],
    rng: random.Random,
    reads: dict[str, Any],
) -> dict[str, Callable[[int], Awaitable[str]]]:
    """The hot reads of the history scenario (bench.history names the rows)."""
    if "readers" not in reads:
        return {}
    import grpc

    from bench.db import READ_SLOT, pool_uuid
    from bench.history import READ_USER
    from booking.v1 import appointment_pb2 as apb
    from booking.v1 import slot_pb2 as spb

    page = int(reads["page_size"])

    async def answer(call: Awaitable[Any], items: Callable[[Any], Any]) -> str:
        try:
            reply = await call
        except grpc.aio.AioRpcError as err:
            return str(err.code().name)
        return "OK" if items(reply) else "EMPTY"

    async def get_slot(k: int) -> str:
        slot = pool_uuid(READ_SLOT, rng.randrange(reads["future_slots"]))
        request = spb.GetSlotRequest(id=str(slot))
        return await answer(
            slots.GetSlot(request, metadata=md, timeout=CALL_TIMEOUT), lambda r: r.slot.id
        )

    def reader() -> str:
        return str(pool_uuid(READ_USER, rng.randrange(reads["readers"])))

    async def list_appointments(k: int) -> str:
        # A user's upcoming appointments: the same two in both databases.
        request = apb.ListAppointmentsRequest(user_id=reader(), page_size=page)
        request.window_start_time.FromSeconds(int(reads["day0"]))
        return await answer(
            appointments.ListAppointments(request, metadata=md, timeout=CALL_TIMEOUT),
            lambda r: r.appointments,
        )

    async def events_resume(k: int) -> str:
        request = apb.ListAppointmentEventsRequest(
            after_cursor=str(reads["resume_cursor"]), page_size=page
        )
        return await answer(
            appointments.ListAppointmentEvents(request, metadata=md, timeout=CALL_TIMEOUT),
            lambda r: r.events,
        )

    async def events_user(k: int) -> str:
        # A page of two: every reader has two events without history (and
        # twelve with it), so both sides answer the same amount.
        request = apb.ListAppointmentEventsRequest(page_size=2)
        request.filter.user_id = reader()
        return await answer(
            appointments.ListAppointmentEvents(request, metadata=md, timeout=CALL_TIMEOUT),
            lambda r: r.events,
        )

    return {
        "get_slot": get_slot,
        "list_appointments": list_appointments,
        "events_resume": events_resume,
        "events_user": events_user,
    }


def _summary(stats: _Stats, start: float, exhausted: bool) -> dict[str, Any]:
    return {
        "calls": stats.calls,
        "codes": dict(stats.codes),
        "latencies": stats.latencies.tobytes(),
        "start": start,
        "end": stats.last if stats.calls else start,
        "exhausted": exhausted,
    }


def latencies_of(result: dict[str, Any]) -> array[float]:
    out = array("d")
    out.frombytes(result.get("latencies", b""))
    return out
