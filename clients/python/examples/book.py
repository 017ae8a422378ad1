"""A booking from start to end: log in, list free slots, hold one, confirm, read back.

    python book.py --target localhost:50051 --email ann@example.com
    (password from BOOKING_PASSWORD, or prompted)

Every transition carries a request_id, so the channel's retry policy (and this
script's own retry below) can repeat it safely: a repeat returns the first outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys

import grpc

from booking.v1 import (
    appointment_pb2,
    appointment_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    slot_pb2,
    slot_pb2_grpc,
)
from booking_client import bearer, error_details, insecure_channel, new_request_id


async def book(target: str, email: str, password: str, specialist_id: str) -> int:
    async with insecure_channel(target) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        slots = slot_pb2_grpc.SlotServiceStub(channel)
        appointments = appointment_pb2_grpc.AppointmentServiceStub(channel)

        login = await auth.Login(auth_pb2.LoginRequest(email=email, password=password))
        md = bearer(login.access_token)
        print(f"logged in as {login.user.email}")

        free = await slots.ListSlots(
            slot_pb2.ListSlotsRequest(
                specialist_id=specialist_id, status=slot_pb2.SLOT_STATUS_AVAILABLE, page_size=10
            ),
            metadata=md,
        )
        if not free.slots:
            print("no free slots", file=sys.stderr)
            return 1
        slot = free.slots[0]
        print(
            f"{len(free.slots)} free slot(s); first {slot.id} at {slot.start_time.ToJsonString()}"
        )

        hold = appointment_pb2.HoldSlotRequest(slot_id=slot.id, request_id=new_request_id())
        held = (await appointments.HoldSlot(hold, metadata=md)).appointment
        print(f"held {held.id} (expires {held.expire_time.ToJsonString()})")

        # A client that lost the reply sends the same request again: the same
        # request_id replays the first outcome instead of failing or holding twice.
        again = (await appointments.HoldSlot(hold, metadata=md)).appointment
        print(f"repeated hold with the same request_id: same appointment: {again.id == held.id}")

        confirm = appointment_pb2.ConfirmAppointmentRequest(id=held.id, request_id=new_request_id())
        confirmed = (await appointments.ConfirmAppointment(confirm, metadata=md)).appointment
        print(f"confirmed {confirmed.id}")

        got = await appointments.GetAppointment(
            appointment_pb2.GetAppointmentRequest(id=held.id), metadata=md
        )
        status = appointment_pb2.AppointmentStatus.Name(got.appointment.status)
        print(f"appointment {got.appointment.id} is {status}")

        # Someone else (or we) holding the same slot now fails with a reason to act on.
        try:
            await appointments.HoldSlot(
                appointment_pb2.HoldSlotRequest(slot_id=slot.id, request_id=new_request_id()),
                metadata=md,
            )
        except grpc.aio.AioRpcError as err:
            print(f"holding it again is refused: {error_details(err)}")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("BOOKING_TARGET", "localhost:50051"))
    parser.add_argument("--email", default=os.environ.get("BOOKING_EMAIL"), required=False)
    parser.add_argument("--specialist-id", default="", help="only this specialist's slots")
    args = parser.parse_args()
    if not args.email:
        parser.error("--email (or BOOKING_EMAIL) is required")
    password = os.environ.get("BOOKING_PASSWORD") or getpass.getpass("Password: ")
    try:
        return asyncio.run(book(args.target, args.email, password, args.specialist_id))
    except grpc.aio.AioRpcError as err:
        print(f"failed: {error_details(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
