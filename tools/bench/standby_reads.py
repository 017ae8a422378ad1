"""Reads on the primary vs on two standbys, in one run (docs/performance.md,
"Reads from standbys").

A primary with two streaming standbys (tests/replication.py), one server in
this process, and a read-heavy mix from concurrent callers: ListSlots and
GetSpecialist reads, one CreateSlot write in ten operations. Four phases:
writes only (the primary's CPU per write), the mix with every read on the
primary, the mix with reads on the standbys without tokens, and the same
with each caller carrying its writes' tokens (booking_client.Session).
PostgreSQL's CPU is read from /proc for each node's processes, so the
primary's CPU per read is the phase's primary CPU less its writes' share.

Run from the repository root:
``PYTHONPATH=tools:clients/python/src:gen .venv/bin/python -m bench.standby_reads``
(``--seconds``, ``--callers``). It prints figures; it asserts nothing. (Not
a scenario of ``booking-service bench``: it needs a replicated cluster, which
tests/replication.py builds.) The writes-only phase runs without standbys,
so its writes skip the token round trip the mixed phases' writes make.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from booking_client import Session, insecure_channel
from service.server import BookingServer
from tests.replication import Node, ReplicatedCluster, replicated_cluster
from tests.support import Api, running_server, ts

TICKS = os.sysconf("SC_CLK_TCK")
WRITE_SHARE = 0.1


def cpu_seconds(node: Node) -> float:
    total = 0
    for pid in node.processes():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


@dataclass
class Phase:
    name: str
    reads: int = 0
    writes: int = 0
    read_latency: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    token_waits: list[float] = field(default_factory=list)
    standby_reads: int = 0
    primary_reads: int = 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def caller(
    api: Api, specialist_id: str, phase: Phase, until: float, write_share: float, rng: random.Random
) -> None:
    while time.monotonic() < until:
        if rng.random() < write_share:
            start = datetime.now(UTC) + timedelta(
                days=400 + rng.randrange(10**6), minutes=rng.randrange(50)
            )
            try:
                await api.slots.CreateSlot(
                    spb.CreateSlotRequest(
                        specialist_id=specialist_id,
                        start_time=ts(start),
                        end_time=ts(start + timedelta(minutes=5)),
                    ),
                    metadata=api.md,
                    timeout=10,
                )
                phase.writes += 1
            except grpc.aio.AioRpcError as err:
                if err.code() is not grpc.StatusCode.ALREADY_EXISTS:
                    raise
            continue
        began = time.perf_counter()
        if rng.random() < 0.5:
            await api.slots.ListSlots(
                spb.ListSlotsRequest(specialist_id=specialist_id, page_size=20),
                metadata=api.md,
                timeout=10,
            )
        else:
            await api.specialists.GetSpecialist(
                sppb.GetSpecialistRequest(id=specialist_id), metadata=api.md, timeout=10
            )
        phase.read_latency.append(time.perf_counter() - began)
        phase.reads += 1


async def run_phase(
    cluster: ReplicatedCluster,
    srv: BookingServer,
    token: str,
    specialist_id: str,
    name: str,
    *,
    seconds: float,
    callers: int,
    write_share: float,
    tokens: bool,
) -> Phase:
    phase = Phase(name)
    nodes = [cluster.primary, *cluster.standbys]
    routed = srv.db.standbys if srv.db is not None else None
    before_waits = len(routed.counters.token_waits) if routed else 0
    before_standby = routed.counters.standby if routed else 0
    channels = []
    apis = []
    for _ in range(callers):
        channel = insecure_channel(
            f"127.0.0.1:{srv.port}", interceptors=[Session()] if tokens else []
        )
        channels.append(channel)
        apis.append(Api(channel, srv, token))
    cpu0 = {n.name: cpu_seconds(n) for n in nodes}
    until = time.monotonic() + seconds
    await asyncio.gather(
        *(
            caller(api, specialist_id, phase, until, write_share, random.Random(f"{name}-{i}"))
            for i, api in enumerate(apis)
        )
    )
    phase.cpu = {n.name: cpu_seconds(n) - cpu0[n.name] for n in nodes}
    for channel in channels:
        await channel.close(grace=None)
    if routed is not None:
        phase.token_waits = routed.counters.token_waits[before_waits:]
        phase.standby_reads = routed.counters.standby - before_standby
    phase.primary_reads = phase.reads - phase.standby_reads
    return phase


async def main(seconds: float, callers: int) -> None:
    async with replicated_cluster(2, synchronous=False) as cluster:
        standbys = ",".join(f"127.0.0.1:{s.pg.port}" for s in cluster.standbys)
        read_url = (
            cluster.standbys[0].url().replace(f"127.0.0.1:{cluster.standbys[0].pg.port}", standbys)
        )
        results: list[Phase] = []
        for label, overrides, phases in (
            (
                "primary",
                {"reads_on_primary": True},
                [("writes only", 1.0, False), ("mix, reads on primary", WRITE_SHARE, False)],
            ),
            (
                "standbys",
                {},
                [
                    ("mix, standbys, no tokens", WRITE_SHARE, False),
                    ("mix, standbys, tokens", WRITE_SHARE, True),
                ],
            ),
        ):
            async with (
                running_server(
                    cluster.primary.url(),
                    read_database_url=read_url,
                    pool_max_size=callers + 2,
                    **overrides,
                ) as srv,
                Api.connect(srv) as api,
            ):
                for name, share, tokens in phases:
                    # A fresh specialist per phase: each phase's reads list
                    # the same number of slots (20 plus its own writes).
                    specialist = await api.specialist()
                    for day in range(20):
                        await api.slot(specialist.id, datetime.now(UTC) + timedelta(days=1 + day))
                    results.append(
                        await run_phase(
                            cluster,
                            srv,
                            str(api.token),
                            specialist.id,
                            name,
                            seconds=seconds,
                            callers=callers,
                            write_share=share,
                            tokens=tokens,
                        )
                    )
                print(
                    f"[{label}] fallbacks to the primary: {getattr(srv.db.standbys, 'fallbacks', {}) if srv.db else {}}"
                )
        report(results)


def report(results: list[Phase]) -> None:
    writes_only = results[0]
    per_write = writes_only.cpu["primary"] / max(1, writes_only.writes)
    print(
        f"primary CPU per write (writes only): {per_write * 1e3:.3f} ms ({writes_only.writes} writes)"
    )
    base: float | None = None
    for phase in results[1:]:
        primary_read_cpu = max(0.0, phase.cpu["primary"] - phase.writes * per_write)
        per_read = primary_read_cpu / max(1, phase.reads)
        standby_cpu = sum(v for k, v in phase.cpu.items() if k != "primary")
        if base is None:
            base = per_read
        off = 1 - per_read / base if base else float("nan")
        print(
            f"{phase.name}: {phase.reads} reads ({phase.standby_reads} on standbys), {phase.writes} writes;"
            f" primary CPU {phase.cpu['primary']:.2f}s, standbys {standby_cpu:.2f}s;"
            f" primary CPU per read {per_read * 1e3:.3f} ms ({off:.0%} off the primary);"
            f" standby CPU per standby read {standby_cpu / max(1, phase.standby_reads) * 1e3:.3f} ms;"
            f" read p50 {pct(phase.read_latency, 0.5) * 1e3:.2f} ms p99 {pct(phase.read_latency, 0.99) * 1e3:.2f} ms"
        )
        if phase.token_waits:
            waits = phase.token_waits
            print(
                f"  token waits ({len(waits)}): p50 {pct(waits, 0.5) * 1e3:.2f} ms"
                f" p90 {pct(waits, 0.9) * 1e3:.2f} ms p99 {pct(waits, 0.99) * 1e3:.2f} ms"
                f" max {max(waits) * 1e3:.2f} ms; mean {statistics.fmean(waits) * 1e3:.2f} ms"
            )


def cli(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--callers", type=int, default=8)
    args = p.parse_args(argv)
    asyncio.run(main(args.seconds, args.callers))


if __name__ == "__main__":
    cli()
