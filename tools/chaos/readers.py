"""Readers with consistency tokens: each writes through one replica of the
service and at once reads the same appointment back through another.

A reader is a client user with a `booking_client.Session` (the client
package's read-your-writes interceptor) on its channels, so every call
carries the tokens of its last writes (docs/reads.md). Its loop: HoldSlot
on one of its own slots, then sometimes ConfirmAppointment, then
CancelAppointment; after each transition answered OK it reads the
appointment back through a *different* replica (GetAppointment or
ListAppointments) with the session's tokens, then once more without any
token (a channel with no session). The writes go through the workload's
Sender (same retries, same request ids, same checks as every other
transition); the reads are recorded as TokenRead for the check
``read_not_older_than_token`` (chaos.checks.check_token_reads).

In a checkout the client package is not installed in the project's
virtualenv (it is a distribution of its own, clients/python): its source
is imported from there, as tools/cluster finds deploy/ beside it.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc

from booking.v1 import appointment_pb2 as apb
from chaos.history import FORBIDDEN, RETRYABLE, History, TokenRead
from chaos.workload import Replicas, RetryPolicy, Seat, Sender, status_name

try:
    from booking_client import Session
except ImportError:  # pragma: no cover - depends on the installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python" / "src"))
    from booking_client import Session

# Attempts of one read-back (each with the policy's deadline), all on the
# read's replica: a read answered UNAVAILABLE is tried again there.
READ_ATTEMPTS = 25
LIST_PAGE_SIZE = 1000


def _update_us(appointment: Any) -> int:
    stamp = appointment.update_time
    return int(stamp.seconds) * 1_000_000 + int(stamp.nanos) // 1000


class Reader:
    def __init__(
        self,
        name: str,
        seat: Seat,
        slots: list[str],
        specialist_id: str,
        targets: list[str],
        history: History,
        rng: random.Random,
        policy: RetryPolicy,
    ) -> None:
        self.name = name
        self.seat = seat
        self.slots = slots
        self.specialist_id = specialist_id
        self.session = Session()
        # Tokened channels (the session's interceptor) and plain ones.
        self.replicas = Replicas(targets, interceptors=[self.session])
        self.plain = Replicas(targets)
        self.history = history
        self.rng = rng
        self.policy = policy
        self.sender = Sender(self.replicas, history, rng, policy)

    async def close(self) -> None:
        await self.replicas.close()
        await self.plain.close()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            slot_id = self.rng.choice(self.slots)
            appt_id = await self._write(
                "HoldSlot",
                apb.HoldSlotRequest(
                    slot_id=slot_id, user_id=self.seat.user_id, request_id=str(uuid.uuid4())
                ),
            )
            if not appt_id:
                await asyncio.sleep(0.05)
                continue
            if self.rng.random() < 0.5 and not stop.is_set():
                await self._write(
                    "ConfirmAppointment",
                    apb.ConfirmAppointmentRequest(id=appt_id, request_id=str(uuid.uuid4())),
                )
            await self._write(
                "CancelAppointment",
                apb.CancelAppointmentRequest(
                    id=appt_id, reason="chaos reader", request_id=str(uuid.uuid4())
                ),
            )

    async def _write(self, op: str, request: Any) -> str:
        """Send a transition; once it is answered OK, read it back twice.
        Returns the appointment id of the answer ("" if not OK)."""
        before = self.session.tokens
        rec = await self.sender.send(op, request, self.name, self.seat)
        ack = rec.acknowledged
        if ack is None or not ack.appointment_id:
            return ""
        token_issued = self.session.tokens != before
        answered = next(
            replica
            for cp in rec.copies
            if cp.answer is not None and cp.answer.code == "OK"
            for code, replica in reversed(cp.attempts)
            if code == "OK"
        )
        other = (answered + 1) % len(self.replicas)
        method = "GetAppointment" if self.rng.random() < 0.7 else "ListAppointments"
        for tokened in (True, False):
            read = TokenRead(
                self.name,
                op,
                rec.request_id,
                ack.appointment_id,
                ack.status,
                answered,
                other,
                method,
                tokened,
                token_issued,
            )
            await self._read(read, self.replicas if tokened else self.plain, tokened)
            self.history.reads.append(read)
        return ack.appointment_id

    async def _read(self, read: TokenRead, replicas: Replicas, retry: bool) -> None:
        stubs = replicas.stubs[read.read_replica]
        delay = self.policy.backoff_min
        for _ in range(READ_ATTEMPTS if retry else 1):
            try:
                if read.method == "GetAppointment":
                    reply = await stubs.appointments.GetAppointment(
                        apb.GetAppointmentRequest(id=read.appointment_id),
                        metadata=self.seat.metadata,
                        timeout=self.policy.deadline,
                    )
                    found: Any = reply.appointment
                else:
                    found = await self._listed(stubs, read.appointment_id)
            except grpc.aio.AioRpcError as err:
                code = err.code().name
                read.attempts.append(code)
                if code in FORBIDDEN:
                    read.messages.append(f"{code}: {err.details()}")
                if code in RETRYABLE:
                    await asyncio.sleep(delay * (0.5 + self.rng.random()))
                    delay = min(self.policy.backoff_max, delay * 2)
                    continue
                read.code = code
                return
            read.attempts.append("OK")
            read.code = "OK"
            if found is not None:
                read.status = status_name(found.status)
                read.update_us = _update_us(found)
            return

    async def _listed(self, stubs: Any, appointment_id: str) -> Any:
        """The appointment as ListAppointments (this user, the readers'
        specialist) shows it, or None if no page has it."""
        token = ""
        while True:
            page = await stubs.appointments.ListAppointments(
                apb.ListAppointmentsRequest(
                    user_id=self.seat.user_id,
                    specialist_id=self.specialist_id,
                    page_size=LIST_PAGE_SIZE,
                    page_token=token,
                ),
                metadata=self.seat.metadata,
                timeout=self.policy.deadline,
            )
            for a in page.appointments:
                if a.id == appointment_id:
                    return a
            token = page.next_page_token
            if not token:
                return None
