"""Prints what the durability gate costs (storage/durability.py).

    .venv/bin/python scripts/durability_figures.py [--holds 200]

Two set-ups from the embedded PostgreSQL (tests/replication.py): a single
PostgreSQL without standbys, and a primary with one synchronous standby.
On each, with the gate and without it (no barrier after the event reads,
and no listening for cancelled synchronous waits):

- hold latency: HoldSlot over gRPC, one at a time;
- delivery latency: from a hold's answer to its event on an open
  WatchAppointmentEvents stream (same process, so one clock);
- event read: one storage.events.read_after of an idle log.

Medians and 95th percentiles in milliseconds. Figures only: the numbers
depend on the machine, nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from booking.v1 import appointment_pb2 as apb  # noqa: E402
from storage import durability  # noqa: E402
from storage import events as event_store  # noqa: E402
from storage.models import EventFilter, Role  # noqa: E402
from tests.replication import ReplicatedCluster, replicated_cluster  # noqa: E402
from tests.support import Api, hours_from_now, running_server  # noqa: E402


@contextmanager
def gate(enabled: bool) -> Iterator[None]:
    saved_gate = event_store._gate_after
    saved_check = durability.CommitWatch.unreplicated
    saved_install = durability.CommitWatch.install
    if not enabled:

        async def ungated(_gate: Any, _row: Any) -> None:
            return None

        setattr(event_store, "_gate_after", ungated)  # noqa: B010

        def never(_self: Any, _conn: Any) -> bool:
            return False

        def nothing(_self: Any, _conn: Any) -> None:
            return None

        setattr(durability.CommitWatch, "unreplicated", never)  # noqa: B010
        setattr(durability.CommitWatch, "install", nothing)  # noqa: B010
    try:
        yield
    finally:
        setattr(event_store, "_gate_after", saved_gate)  # noqa: B010
        setattr(durability.CommitWatch, "unreplicated", saved_check)  # noqa: B010
        setattr(durability.CommitWatch, "install", saved_install)  # noqa: B010


def summary(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return f"median {statistics.median(ms):7.3f}  p95 {p95:7.3f}"


async def measure(cluster: ReplicatedCluster, holds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"hold": [], "delivery": [], "read": []}
    async with running_server(cluster.primary.url(), pool_max_size=10) as srv:
        async with Api.connect(srv) as api:
            operator = api.as_(await api.make_token(Role.ADMIN))
            specialist = await api.specialist()
            slots = [
                await api.slot(specialist.id, hours_from_now(24 + i)) for i in range(holds + 10)
            ]
            client, _ = await api.client()
            call = operator.appointments.WatchAppointmentEvents(
                apb.WatchAppointmentEventsRequest(start_position=apb.WATCH_START_POSITION_NOW),
                metadata=operator.md,
            )
            await call.read()
            arrived: dict[str, float] = {}
            seen = asyncio.Event()

            async def consume() -> None:
                while True:
                    message = await call.read()
                    assert isinstance(message, apb.WatchAppointmentEventsResponse)
                    if message.HasField("event"):
                        arrived[message.event.appointment.id] = time.perf_counter()
                        seen.set()

            consumer = asyncio.ensure_future(consume())
            for i, slot in enumerate(slots):
                started = time.perf_counter()
                appointment = await client.hold(slot.id)
                answered = time.perf_counter()
                while appointment.id not in arrived:
                    seen.clear()
                    await seen.wait()
                if i >= 10:  # warm-up
                    out["hold"].append(answered - started)
                    out["delivery"].append(arrived[appointment.id] - answered)
            consumer.cancel()
            call.cancel()
            assert srv.db is not None
            head = await event_store.stable_head(srv.db)
            for _ in range(holds):
                started = time.perf_counter()
                await event_store.read_after(srv.db, head, EventFilter(), 500)
                out["read"].append(time.perf_counter() - started)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--holds", type=int, default=200)
    args = parser.parse_args()
    for label, standbys in (("single PostgreSQL", 0), ("primary + 1 synchronous standby", 1)):
        async with replicated_cluster(standbys) as cluster:
            for enabled in (False, True, False, True):
                with gate(enabled):
                    figures = await measure(cluster, args.holds)
                name = f"{label}, gate {'on ' if enabled else 'off'}"
                for kind, values in figures.items():
                    print(f"{name}  {kind:8}  {summary(values)}  (n={len(values)})", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
