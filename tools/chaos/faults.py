"""Faults, and how long the service takes to recover from each.

Kinds:
  terminate_backend     pg_terminate_backend() of a few of the service's connections
  kill_replica          SIGKILL of one replica, restarted after a moment
  pg_restart_fast       pg_ctl restart -m fast
  pg_restart_immediate  pg_ctl restart -m immediate (crash recovery on start)
  pg_sigstop            SIGSTOP of every PostgreSQL process, SIGCONT a few seconds later

After each fault ends (the database accepts connections again, the
processes are resumed, the replica is started again) the injector measures
the time until every replica's health check says SERVING and until the
first successful HoldSlot (a probe user holding, then cancelling, a slot of
its own).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from booking.v1 import appointment_pb2 as apb
from chaos.cluster import Cluster
from chaos.patroni import CLUSTER_KINDS, PatroniChaosCluster
from chaos.workload import Replicas, Sender, World
from storage import hosts

KINDS = (
    "terminate_backend",
    "kill_replica",
    "pg_restart_fast",
    "pg_restart_immediate",
    "pg_sigstop",
)

RECOVERY_TIMEOUT = 120.0


@dataclass
class FaultRecord:
    kind: str
    started: float
    detail: str = ""
    duration: float = 0.0
    to_serving: float | None = None
    to_first_hold: float | None = None
    # Whether any replica's health check said anything but SERVING while
    # the fault lasted (information, not a check).
    health_noticed: bool = False
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Injector:
    cluster: Cluster | PatroniChaosCluster
    replicas: Replicas
    world: World
    sender: Sender
    rng: random.Random
    kinds: list[str]
    sigstop_seconds: float = 3.0
    records: list[FaultRecord] = field(default_factory=list)
    _probe_slot: int = 0
    _order: list[str] = field(default_factory=list)

    def next_kind(self) -> str:
        """Every kind once per round, in a fresh random order each round, so
        the counts stay even whatever the run's length."""
        done = len(self.records)
        if done % len(self.kinds) == 0:
            self._order = self.rng.sample(self.kinds, len(self.kinds))
        return self._order[done % len(self.kinds)]

    async def inject(self, kind: str) -> FaultRecord:
        rec = FaultRecord(kind, time.monotonic())
        self.records.append(rec)
        watcher = asyncio.create_task(self._watch_health(rec))
        if kind in CLUSTER_KINDS:
            return await self._inject_cluster(rec, watcher)
        try:
            if kind == "terminate_backend":
                rec.detail = await self._terminate_backends()
            elif kind == "kill_replica":
                replica = self.rng.choice(self.cluster.replicas)
                await asyncio.to_thread(replica.kill)
                await asyncio.sleep(0.5 + self.rng.random())
                await asyncio.to_thread(self.cluster.restart_replica, replica)
                rec.detail = replica.name
            elif kind in ("pg_restart_fast", "pg_restart_immediate"):
                mode = kind.rsplit("_", 1)[1]
                await asyncio.to_thread(self.cluster.pg_restart, mode)
            elif kind == "pg_sigstop":
                frozen = await asyncio.to_thread(self.cluster.pg_freeze, self.sigstop_seconds)
                rec.detail = f"{frozen} processes for {self.sigstop_seconds:.1f}s"
            else:
                raise ValueError(f"unknown fault kind {kind}")
        except Exception as exc:  # noqa: BLE001 - a fault that failed is reported, not fatal
            rec.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            watcher.cancel()
        back = time.monotonic()
        rec.duration = back - rec.started
        serving, hold = await asyncio.gather(self._until_serving(), self._until_hold())
        rec.to_serving = None if serving is None else serving - back
        rec.to_first_hold = None if hold is None else hold - back
        return rec

    async def _inject_cluster(self, rec: FaultRecord, watcher: asyncio.Task[None]) -> FaultRecord:
        """A cluster fault: the first successful hold is timed from the
        fault's start (a hang must not hold the service until the hung node
        resumes), SERVING from its end."""
        assert isinstance(self.cluster, PatroniChaosCluster)
        cluster = self.cluster
        try:
            before = await asyncio.to_thread(cluster.prepare)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            watcher.cancel()
            rec.error = f"{type(exc).__name__}: {exc}"[:300]
            return rec
        rec.started = time.monotonic()
        cluster.hit_at = None

        # The probe starts once the fault has hit, and the clock with it.
        async def probe() -> float | None:
            while cluster.hit_at is None:  # noqa: ASYNC110 - set by the fault's thread
                await asyncio.sleep(0.01)
            rec.started = cluster.hit_at
            return await self._until_hold()

        hold = asyncio.create_task(probe())
        try:
            rec.detail = await asyncio.to_thread(cluster.cluster_fault, rec.kind, before)
        except Exception as exc:  # noqa: BLE001 - a fault that failed is reported, not fatal
            rec.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            watcher.cancel()
        back = time.monotonic()
        if cluster.hit_at is None:  # the fault failed before it hit
            cluster.hit_at = back
        rec.started = cluster.hit_at
        rec.duration = back - rec.started
        serving = await self._until_serving()
        held = await hold
        rec.to_serving = None if serving is None else serving - back
        rec.to_first_hold = None if held is None else held - rec.started
        return rec

    async def _terminate_backends(self) -> str:
        conn = await hosts.connect(self.cluster.url, timeout=10)
        try:
            pids: list[Any] = []
            # Right after another fault the pools may still be reconnecting.
            for _ in range(50):
                pids = await conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'booking-service'"
                )
                if pids:
                    break
                await asyncio.sleep(0.1)
            victims = [r["pid"] for r in pids if self.rng.random() < 0.5] or [
                r["pid"] for r in pids[:1]
            ]
            for pid in victims:
                await conn.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        return f"{len(victims)} of {len(pids)} backends"

    async def _watch_health(self, rec: FaultRecord) -> None:
        while not rec.health_noticed:
            for stubs in self.replicas.stubs:
                try:
                    reply = await stubs.health.Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=0.5
                    )
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        rec.health_noticed = True
                except grpc.aio.AioRpcError:
                    rec.health_noticed = True
            await asyncio.sleep(0.1)

    async def _until_serving(self) -> float | None:
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        pending = set(range(len(self.replicas)))
        while pending and time.monotonic() < deadline:
            for i in list(pending):
                try:
                    reply = await self.replicas.stubs[i].health.Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1.0
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        pending.discard(i)
                except grpc.aio.AioRpcError:
                    pass
            if pending:
                await asyncio.sleep(0.05)
        return None if pending else time.monotonic()

    async def _until_hold(self) -> float | None:
        """The probe holds a slot of its own (then cancels it), retrying
        with the same request_id until the hold succeeds."""
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        probe = self.world.probe
        while time.monotonic() < deadline:
            slot = self.world.probe_slots[self._probe_slot % len(self.world.probe_slots)]
            self._probe_slot += 1
            rec = await self.sender.send(
                "HoldSlot",
                apb.HoldSlotRequest(
                    slot_id=slot, user_id=probe.user_id, request_id=str(uuid.uuid4())
                ),
                "probe",
                probe,
            )
            ack = rec.acknowledged
            if ack is not None:
                done = time.monotonic()
                await self.sender.send(
                    "CancelAppointment",
                    apb.CancelAppointmentRequest(
                        id=ack.appointment_id, reason="probe", request_id=str(uuid.uuid4())
                    ),
                    "probe",
                    probe,
                )
                return done
            await asyncio.sleep(0.05)
        return None
