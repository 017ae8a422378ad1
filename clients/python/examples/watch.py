"""Follow the appointment event stream, checkpointing to a file and resuming
from it after a restart or a lost connection.

    python watch.py --target localhost:50051 --email ops@example.com --checkpoint events.cursor
    (password from BOOKING_PASSWORD, or prompted)

Run it again with the same --checkpoint file and it carries on after the last
event it handled. Needs an OPERATOR or ADMIN to see every event (a CLIENT sees
its own).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys

import grpc

from booking.v1 import appointment_pb2, auth_pb2, auth_pb2_grpc
from booking_client import (
    CursorExpired,
    EventConsumer,
    FileCheckpoint,
    bearer,
    error_details,
    insecure_channel,
)

START = {
    "beginning": appointment_pb2.WATCH_START_POSITION_BEGINNING,
    "now": appointment_pb2.WATCH_START_POSITION_NOW,
}


async def watch(args: argparse.Namespace, password: str) -> int:
    async with insecure_channel(args.target) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        token: list[str] = []

        async def metadata() -> list[tuple[str, str]]:
            # Logged in lazily, on the first connection that gets through.
            if not token:
                login = await auth.Login(auth_pb2.LoginRequest(email=args.email, password=password))
                token.append(login.access_token)
            return bearer(token[0])

        event_filter = appointment_pb2.AppointmentEventFilter(specialist_id=args.specialist_id)
        consumer = EventConsumer(
            channel,
            FileCheckpoint(args.checkpoint),
            metadata=metadata,
            event_filter=event_filter,
            start_position=START[args.start],
            idle_timeout=args.idle_timeout,
        )
        seen = 0

        async def handle(event: appointment_pb2.AppointmentEvent) -> None:
            nonlocal seen
            seen += 1
            kind = appointment_pb2.AppointmentEventType.Name(event.type)
            status = appointment_pb2.AppointmentStatus.Name(event.appointment.status)
            print(
                f"{kind} appointment={event.appointment.id} status={status} cursor={event.cursor}"
            )
            sys.stdout.flush()
            if args.max_events and seen >= args.max_events:
                consumer.stop()

        try:
            await consumer.run(handle)
        except CursorExpired as exc:
            print(f"cannot resume: {exc}", file=sys.stderr)
            return 3
        except grpc.aio.AioRpcError as err:
            print(f"stream refused: {error_details(err)}", file=sys.stderr)
            return 2
        print(f"handled {seen} event(s); checkpoint {consumer.checkpoint.load()}")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("BOOKING_TARGET", "localhost:50051"))
    parser.add_argument("--email", default=os.environ.get("BOOKING_EMAIL"))
    parser.add_argument("--checkpoint", default="events.cursor", help="cursor file")
    parser.add_argument(
        "--start", choices=sorted(START), default="beginning", help="without a checkpoint"
    )
    parser.add_argument("--specialist-id", default="", help="only this specialist's events")
    parser.add_argument("--max-events", type=int, default=0, help="stop after N (0: never)")
    parser.add_argument(
        "--idle-timeout", type=float, default=60.0, help="reconnect after this long with no message"
    )
    args = parser.parse_args()
    if not args.email:
        parser.error("--email (or BOOKING_EMAIL) is required")
    password = os.environ.get("BOOKING_PASSWORD") or getpass.getpass("Password: ")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(watch(args, password))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
