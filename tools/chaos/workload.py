"""The randomized workload: who books what, and how a client retries.

Every transition carries a fresh request_id. On UNAVAILABLE,
DEADLINE_EXCEEDED or ABORTED (which is also how a lost connection shows up)
the client sends the SAME request with the SAME request_id again, to any
replica, a bounded number of times. Sometimes it sends two copies at once to
different replicas. Every attempt and every definitive answer is recorded.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2_grpc

from bench import db as bench_db
from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc, auth_pb2, auth_pb2_grpc, slot_pb2, slot_pb2_grpc
from chaos.history import FORBIDDEN, RETRYABLE, Answer, Copy, History, Request
from service import passwords
from storage import users as user_store
from storage.database import Database
from storage.models import Role

PASSWORD = "chaos-password-not-secret"
CHANNEL_OPTIONS = [
    # A restarted replica must be found again within a second, not after the
    # default reconnect backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def status_name(value: int) -> str:
    return apb.AppointmentStatus.Name(value).removeprefix("APPOINTMENT_STATUS_")  # type: ignore[arg-type]


def error_reason(err: grpc.aio.AioRpcError) -> str:
    trailing = cast(grpc.aio.Metadata | None, err.trailing_metadata())
    for key, value in trailing or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return str(info.reason)
    return ""


class Stubs:
    """Every stub this suite uses, on one channel to one replica."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.appointments = appointment_pb2_grpc.AppointmentServiceStub(channel)
        self.slots = slot_pb2_grpc.SlotServiceStub(channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def method(self, op: str) -> Callable[..., Awaitable[Any]]:
        service = self.slots if op in ("GetSlot", "ListSlots") else self.appointments
        return cast(Callable[..., Awaitable[Any]], getattr(service, op))


class Replicas:
    """One channel per replica address; channels reconnect by themselves
    when a replica comes back on its port."""

    def __init__(self, targets: list[str], interceptors: list[Any] | None = None) -> None:
        self.targets = targets
        self.stubs = [
            Stubs(grpc.aio.insecure_channel(t, options=CHANNEL_OPTIONS, interceptors=interceptors))
            for t in targets
        ]

    def __len__(self) -> int:
        return len(self.stubs)

    async def close(self) -> None:
        for s in self.stubs:
            await s.channel.close(None)


@dataclass
class Seat:
    """A user the workload acts as. Several clients may share one seat:
    the same user racing itself."""

    user_id: str
    email: str
    role: Role
    token: str = ""
    # Appointments this user may still move: id -> slot id.
    known: dict[str, str] = field(default_factory=dict)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


@dataclass
class World:
    specialists: list[str]
    future: dict[str, list[str]]
    past: dict[str, list[str]]
    probe_slots: list[str]
    seats: list[Seat]
    operator: Seat
    probe: Seat
    slot_specialist: dict[str, str] = field(default_factory=dict)
    probe_specialist: str = ""
    # Confirmed appointments anyone saw: id -> slot id (for MarkNoShow).
    confirmed: dict[str, str] = field(default_factory=dict)
    # The readers (chaos.readers): their users, and a specialist of their
    # own whose future slots they share out, so their holds mostly succeed.
    readers: list[Seat] = field(default_factory=list)
    reader_specialist: str = ""
    reader_slots: list[str] = field(default_factory=list)

    def all_slots(self) -> list[str]:
        return list(self.slot_specialist)


async def seed(
    url: str,
    *,
    users: int,
    specialists: int,
    future_slots: int,
    past_slots: int,
    readers: int = 0,
) -> World:
    """Users straight into storage (one password hash for all of them, to
    spare the CPU), specialists and slots straight into SQL, so set-up takes
    seconds. Past slots exist so MarkNoShow can succeed."""
    password_hash = await passwords.hash_password(PASSWORD)
    db = await Database.connect(url, min_size=1, max_size=1)
    tag = uuid.uuid4().hex[:6]

    async def user(role: Role, name: str) -> Seat:
        email = f"chaos-{name}-{tag}@chaos.invalid"
        created = await user_store.create(db, email=email, password_hash=password_hash, role=role)
        return Seat(str(created.id), email, role)

    try:
        operator = await user(Role.OPERATOR, "operator")
        probe = await user(Role.CLIENT, "probe")
        seats = [await user(Role.CLIENT, f"client{i}") for i in range(users)]
        reader_seats = [await user(Role.CLIENT, f"reader{i}") for i in range(readers)]
    finally:
        await db.close()

    conn = await bench_db.connect(url)
    world = World([], {}, {}, [], seats, operator, probe, readers=reader_seats)
    slot_length = timedelta(minutes=30)
    try:
        for s in range(specialists + 1):
            spec = str(uuid.uuid4())
            await conn.execute(
                "INSERT INTO specialists (id, full_name, service_type) VALUES ($1, $2, 'chaos')",
                uuid.UUID(spec),
                f"Chaos {s}" if s < specialists else "Chaos probe",
            )
            # The same times on the next SERIES_DAYS days too, so that a
            # daily series finds its occurrences' slots (docs/seats.md).
            rows = await conn.fetch(
                "INSERT INTO time_slots (id, specialist_id, start_time, end_time)"
                " SELECT gen_random_uuid(), $1,"
                "  date_trunc('hour', now()) + k * $2::interval,"
                "  date_trunc('hour', now()) + (k + 1) * $2::interval"
                " FROM (SELECT DISTINCT d * 48 + g AS k"
                "       FROM generate_series(0, $5::int) d, generate_series($3::int, $4::int) g"
                "       WHERE d = 0 OR g >= 0) o"
                " RETURNING id::text, start_time < now() AS past",
                uuid.UUID(spec),
                slot_length,
                -past_slots if s < specialists else 2,
                future_slots + 1,
                SERIES_DAYS if s < specialists else 0,
            )
            ids = [r["id"] for r in rows if not r["past"]]
            if s == specialists:
                world.probe_slots = ids
                world.probe_specialist = spec
                continue
            # Seats and buffers (docs/seats.md): every third specialist keeps
            # 15 minutes after each appointment, so back-to-back holds race
            # into its buffer; every third other has slots of 3 seats.
            if s % 3 == 1:
                await conn.execute(
                    "UPDATE specialists SET buffer_after_minutes = 15 WHERE id = $1",
                    uuid.UUID(spec),
                )
            elif s % 3 == 2:
                await conn.execute(
                    "UPDATE time_slots SET capacity = 3 WHERE specialist_id = $1",
                    uuid.UUID(spec),
                )
            world.specialists.append(spec)
            world.future[spec] = ids
            world.past[spec] = [r["id"] for r in rows if r["past"]]
            for r in rows:
                world.slot_specialist[r["id"]] = spec
        if readers:
            spec = str(uuid.uuid4())
            await conn.execute(
                "INSERT INTO specialists (id, full_name, service_type)"
                " VALUES ($1, 'Chaos readers', 'chaos')",
                uuid.UUID(spec),
            )
            world.reader_specialist = spec
            world.reader_slots = [
                r["id"]
                for r in await conn.fetch(
                    "INSERT INTO time_slots (id, specialist_id, start_time, end_time)"
                    " SELECT gen_random_uuid(), $1,"
                    "  date_trunc('hour', now()) + k * $2::interval,"
                    "  date_trunc('hour', now()) + (k + 1) * $2::interval"
                    " FROM generate_series(2, $3::int + 1) k RETURNING id::text",
                    uuid.UUID(spec),
                    slot_length,
                    max(4, 4 * readers),
                )
            ]
    finally:
        await conn.close()
    return world


async def login(replicas: Replicas, world: World) -> None:
    for seat in [world.operator, world.probe, *world.seats, *world.readers]:
        reply = await replicas.stubs[0].auth.Login(
            auth_pb2.LoginRequest(email=seat.email, password=PASSWORD), timeout=60
        )
        seat.token = reply.access_token


@dataclass
class RetryPolicy:
    deadline: float = 2.0
    attempts: int = 25
    backoff_min: float = 0.05
    backoff_max: float = 1.0


class Sender:
    """Sends a request (one or more copies), retrying each copy with the
    same request_id, and records everything in the history."""

    def __init__(
        self, replicas: Replicas, history: History, rng: random.Random, policy: RetryPolicy
    ) -> None:
        self.replicas = replicas
        self.history = history
        self.rng = rng
        self.policy = policy

    async def send(
        self, op: str, request: Any, client: str, seat: Seat, *, copies: int = 1
    ) -> Request:
        rec = Request(
            getattr(request, "request_id", "") or "",
            op,
            client,
            seat.user_id,
            time.monotonic(),
        )
        self.history.requests.append(rec)
        self.last_reply = None
        n = len(self.replicas)
        first = self.rng.randrange(n)
        await asyncio.gather(
            *(self._copy(op, request, seat, (first + i) % n, rec) for i in range(copies))
        )
        return rec

    async def _copy(self, op: str, request: Any, seat: Seat, replica: int, rec: Request) -> None:
        cp = Copy()
        rec.copies.append(cp)
        delay = self.policy.backoff_min
        for _ in range(self.policy.attempts):
            method = self.replicas.stubs[replica].method(op)
            try:
                reply = await method(request, metadata=seat.metadata, timeout=self.policy.deadline)
            except grpc.aio.AioRpcError as err:
                code = err.code().name
                cp.attempts.append((code, replica))
                if code in FORBIDDEN:
                    cp.messages.append(f"{code}: {err.details()}")
                if code in RETRYABLE:
                    await asyncio.sleep(delay * (0.5 + self.rng.random()))
                    delay = min(self.policy.backoff_max, delay * 2)
                    replica = self.rng.randrange(len(self.replicas))
                    continue
                cp.answer = Answer(code, error_reason(err))
                return
            cp.attempts.append(("OK", replica))
            appt = getattr(reply, "appointment", None)
            if appt is not None and appt.id:
                cp.answer = Answer("OK", "", appt.id, status_name(appt.status), appt.slot_id)
            else:
                cp.answer = Answer("OK")
            self.last_reply = reply
            return

    # The reply of the latest successful attempt (what a read returned).
    last_reply: Any = None


# Days after the first on which each specialist's slots repeat (seed).
SERIES_DAYS = 2
SERIES_MODES = (apb.SERIES_MODE_ALL_OR_NOTHING, apb.SERIES_MODE_AS_MANY_AS_POSSIBLE)

WEIGHTS_CLIENT = {
    "HoldSlot": 30,
    "HoldSeries": 3,
    "ConfirmAppointment": 22,
    "CancelAppointment": 12,
    "RescheduleAppointment": 12,
    "GetSlot": 8,
    "ListSlots": 6,
    "ListAppointments": 10,
}
WEIGHTS_OPERATOR = {
    "MarkNoShow": 45,
    "HoldSlot": 20,
    "CancelAppointment": 10,
    "GetSlot": 10,
    "ListAppointments": 15,
}


class Client:
    """One closed-loop client: pick a transition that makes sense for what
    it knows, send it, learn from the answer."""

    def __init__(
        self,
        name: str,
        seat: Seat,
        world: World,
        sender: Sender,
        rng: random.Random,
        duplicate_rate: float,
    ) -> None:
        self.name = name
        self.seat = seat
        self.world = world
        self.sender = sender
        self.rng = rng
        self.duplicate_rate = duplicate_rate
        self.operator = seat.role is Role.OPERATOR
        weights = WEIGHTS_OPERATOR if self.operator else WEIGHTS_CLIENT
        self.ops = list(weights)
        self.weights = list(weights.values())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            op = self.rng.choices(self.ops, self.weights)[0]
            await self.step(op)

    def _copies(self) -> int:
        return 2 if self.rng.random() < self.duplicate_rate else 1

    def _slot(self, specialist: str | None = None) -> str:
        spec = specialist or self.rng.choice(self.world.specialists)
        pool = self.world.past[spec] if self.rng.random() < 0.3 else self.world.future[spec]
        return self.rng.choice(pool or self.world.future[spec])

    async def step(self, op: str) -> None:
        rid = str(uuid.uuid4())
        seat = self.seat
        if op == "HoldSlot":
            # The operator books for a random client user.
            owner = self.rng.choice(self.world.seats) if self.operator else seat
            # Now and then a party of two (a slot of one seat refuses it).
            party = 2 if self.rng.random() < 0.1 else 1
            req: Any = apb.HoldSlotRequest(
                slot_id=self._slot(), user_id=owner.user_id, request_id=rid, party_size=party
            )
            rec = await self.sender.send(op, req, self.name, seat, copies=self._copies())
            self._learn(rec, owner)
            return
        if op == "HoldSeries":
            spec = self.rng.choice(self.world.specialists)
            req = apb.HoldSeriesRequest(
                first_slot_id=self.rng.choice(self.world.future[spec]),
                recurrence=f"FREQ=DAILY;COUNT={self.rng.randint(2, SERIES_DAYS + 1)}",
                mode=self.rng.choice(SERIES_MODES),
                user_id=seat.user_id,
                request_id=rid,
            )
            rec = await self.sender.send(op, req, self.name, seat, copies=self._copies())
            reply = self.sender.last_reply
            if rec.acknowledged is not None and isinstance(reply, apb.HoldSeriesResponse):
                for o in reply.occurrences:
                    if o.HasField("appointment"):
                        seat.known[o.appointment.id] = o.appointment.slot_id
            return
        if op in ("ConfirmAppointment", "CancelAppointment", "RescheduleAppointment"):
            known = self.world.confirmed if self.operator else seat.known
            if not known:
                await self.step("HoldSlot")
                return
            appt_id, slot_id = self.rng.choice(list(known.items()))
            if op == "ConfirmAppointment":
                req = apb.ConfirmAppointmentRequest(id=appt_id, request_id=rid)
            elif op == "CancelAppointment":
                req = apb.CancelAppointmentRequest(id=appt_id, reason="chaos", request_id=rid)
            else:
                new_slot = self._slot(self.world.slot_specialist[slot_id])
                req = apb.RescheduleAppointmentRequest(
                    id=appt_id, new_slot_id=new_slot, request_id=rid
                )
            rec = await self.sender.send(op, req, self.name, seat, copies=self._copies())
            self._learn(rec, seat, appt_id)
            return
        if op == "MarkNoShow":
            if not self.world.confirmed:
                await self.step("ListAppointments")
                return
            appt_id = self.rng.choice(list(self.world.confirmed))
            req = apb.MarkNoShowRequest(id=appt_id, request_id=rid)
            rec = await self.sender.send(op, req, self.name, seat, copies=self._copies())
            self._learn(rec, seat, appt_id)
            return
        if op == "GetSlot":
            await self.sender.send(
                op,
                slot_pb2.GetSlotRequest(id=self.rng.choice(self.world.all_slots())),
                self.name,
                seat,
            )
            return
        if op == "ListSlots":
            req = slot_pb2.ListSlotsRequest(
                specialist_id=self.rng.choice(self.world.specialists), page_size=100
            )
            await self.sender.send(op, req, self.name, seat)
            return
        if op == "ListAppointments":
            if self.operator:
                req = apb.ListAppointmentsRequest(
                    specialist_id=self.rng.choice(self.world.specialists),
                    status=apb.APPOINTMENT_STATUS_CONFIRMED,
                    page_size=200,
                )
            else:
                req = apb.ListAppointmentsRequest(user_id=seat.user_id, page_size=200)
            rec = await self.sender.send(op, req, self.name, seat)
            reply = self.sender.last_reply
            ok = rec.acknowledged is not None and isinstance(reply, apb.ListAppointmentsResponse)
            if ok:
                for a in reply.appointments:
                    live = a.status in (
                        apb.APPOINTMENT_STATUS_HOLD,
                        apb.APPOINTMENT_STATUS_CONFIRMED,
                    )
                    if self.operator and a.status == apb.APPOINTMENT_STATUS_CONFIRMED:
                        self.world.confirmed[a.id] = a.slot_id
                    elif not self.operator and live:
                        seat.known[a.id] = a.slot_id
            return
        raise ValueError(f"unknown operation {op}")

    def _learn(self, rec: Request, owner: Seat, appt_id: str = "") -> None:
        ack = rec.acknowledged
        if ack is not None:
            if ack.status in ("HOLD", "CONFIRMED"):
                owner.known[ack.appointment_id] = ack.slot_id
            else:
                owner.known.pop(ack.appointment_id, None)
            if ack.status == "CONFIRMED":
                self.world.confirmed[ack.appointment_id] = ack.slot_id
            else:
                self.world.confirmed.pop(ack.appointment_id, None)
            return
        answers = rec.answers
        if appt_id and answers and answers[0].code in ("FAILED_PRECONDITION", "NOT_FOUND"):
            if answers[0].reason in ("WRONG_STATE", "HOLD_EXPIRED", "APPOINTMENT_NOT_FOUND"):
                owner.known.pop(appt_id, None)
                self.world.confirmed.pop(appt_id, None)
