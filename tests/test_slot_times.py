"""The slot's times kept on each appointment (appointments.slot_start,
slot_end): set by the transactions that take a slot, whoever races them,
and backfilled in batches under live traffic for rows written before the
columns existed, with the overlap check and a user's upcoming appointments
correct at every point of the backfill."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta

import asyncpg
import grpc
import pytest

from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc
from booking.v1 import slot_pb2 as spb
from storage import backfill
from storage.models import Role
from tests.population import fetch, insert_clients
from tests.support import Api, expect_failure, hours_from_now, ts

# What a transition may answer in these races: refused (taken, overlapping,
# no longer a hold) or a conflict whose retries ran out.
_REFUSED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED)

# Every appointment whose copy differs from its slot (NULL counts as different).
_MISMATCHED = """
SELECT a.id, a.status, a.slot_start, a.slot_end, s.start_time, s.end_time
FROM appointments a JOIN time_slots s ON s.id = a.time_slot_id
WHERE a.slot_start IS DISTINCT FROM s.start_time OR a.slot_end IS DISTINCT FROM s.end_time
"""


async def _slots(api: Api, count: int, minutes: int = 30) -> list[str]:
    """`count` slots over a few specialists, some of them overlapping in time
    across specialists (so the user-overlap check has work to do)."""
    specs = [await api.specialist(name=f"Specialist {i}") for i in range(4)]
    base = hours_from_now(30)
    ids = []
    for i in range(count):
        spec = specs[i % len(specs)]
        start = base + timedelta(minutes=(i // len(specs)) * minutes + 7 * (i % len(specs)))
        ids.append((await api.slot(spec.id, start, minutes=minutes)).id)
    return ids


async def test_concurrent_holds_confirms_cancels_and_reschedules_keep_each_copy_equal_to_its_slot(
    api: Api, database_url: str
) -> None:
    operator = api.as_(await api.make_token(Role.OPERATOR))
    slots = await _slots(api, 40)
    users = await insert_clients(database_url, 12)
    target = f"127.0.0.1:{api.server.port}"
    channels = [grpc.aio.insecure_channel(target) for _ in range(8)]
    rng = random.Random(22)
    done: list[str] = []

    async def worker(w: int) -> None:
        stub = appointment_pb2_grpc.AppointmentServiceStub(channels[w % len(channels)])
        md = operator.md
        for _ in range(25):
            user = rng.choice(users)
            try:
                held = await stub.HoldSlot(
                    apb.HoldSlotRequest(slot_id=rng.choice(slots), user_id=user), metadata=md
                )
            except grpc.aio.AioRpcError as err:
                assert err.code() in _REFUSED, err
                continue
            appt = held.appointment.id
            for step in rng.sample(["confirm", "reschedule", "reschedule", "cancel"], k=3):
                try:
                    if step == "confirm":
                        await stub.ConfirmAppointment(
                            apb.ConfirmAppointmentRequest(id=appt), metadata=md
                        )
                    elif step == "reschedule":
                        await stub.RescheduleAppointment(
                            apb.RescheduleAppointmentRequest(
                                id=appt, new_slot_id=rng.choice(slots)
                            ),
                            metadata=md,
                        )
                    else:
                        await stub.CancelAppointment(
                            apb.CancelAppointmentRequest(id=appt), metadata=md
                        )
                except grpc.aio.AioRpcError as err:
                    assert err.code() in _REFUSED, err
            done.append(appt)

    try:
        await asyncio.gather(*(worker(w) for w in range(16)))
    finally:
        await asyncio.gather(*(ch.close(None) for ch in channels))

    rows = await fetch(database_url, "SELECT count(*) AS n FROM appointments")
    assert rows[0]["n"] >= 40, "the race made appointments"
    moved = await fetch(
        database_url,
        "SELECT count(DISTINCT appointment_id) AS n FROM appointment_events"
        " WHERE event_type = 'RESCHEDULED'",
    )
    assert moved[0]["n"] > 0, "some appointments were rescheduled"
    assert await fetch(database_url, _MISMATCHED) == []


async def _forget_slot_times(database_url: str) -> None:
    """Make every appointment look as if written before the columns existed
    (the trigger runs only when time_slot_id is written)."""
    await fetch(database_url, "UPDATE appointments SET slot_start = NULL, slot_end = NULL")


async def test_the_overlap_check_and_upcoming_appointments_read_rows_not_yet_backfilled(
    api: Api, database_url: str
) -> None:
    client, _ = await api.client()
    spec = await api.specialist()
    other = await api.specialist(name="Dr. Other")
    start = hours_from_now(30)
    mine = await client.hold((await api.slot(spec.id, start, minutes=60)).id)
    await client.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=mine.id), metadata=client.md
    )
    overlapping = await api.slot(other.id, start + timedelta(minutes=30))
    await _forget_slot_times(database_url)

    for _ in range(2):  # before the backfill, then after it
        async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "USER_OVERLAP"):
            await client.hold(overlapping.id)
        listed = await client.appointments.ListAppointments(
            apb.ListAppointmentsRequest(window_start_time=ts(start + timedelta(minutes=59))),
            metadata=client.md,
        )
        assert [a.id for a in listed.appointments] == [mine.id]
        later = await client.appointments.ListAppointments(
            apb.ListAppointmentsRequest(window_start_time=ts(start + timedelta(minutes=60))),
            metadata=client.md,
        )
        assert list(later.appointments) == []
        assert api.server.db is not None
        await backfill.slot_times(api.server.db, batch_size=1)
        assert await fetch(database_url, _MISMATCHED) == []


async def test_the_backfill_runs_in_batches_under_live_traffic_and_leaves_every_copy_right(
    api: Api, database_url: str
) -> None:
    operator = api.as_(await api.make_token(Role.OPERATOR))
    slots = await _slots(api, 60)
    users = await insert_clients(database_url, 20)
    for i, slot in enumerate(slots[:40]):
        await operator.hold(slot, users[i % len(users)])
    await _forget_slot_times(database_url)
    assert api.server.db is not None
    db = api.server.db
    stop = asyncio.Event()
    outcomes: list[str] = []

    async def traffic() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            user = rng.choice(users)
            try:
                held = await operator.hold(rng.choice(slots), user)
                outcomes.append("held")
                await operator.appointments.RescheduleAppointment(
                    apb.RescheduleAppointmentRequest(id=held.id, new_slot_id=rng.choice(slots)),
                    metadata=operator.md,
                )
                outcomes.append("rescheduled")
            except grpc.aio.AioRpcError as err:
                assert err.code() in _REFUSED, err
                outcomes.append(err.details() or "")

    batches: list[backfill.Progress] = []
    runners = [asyncio.create_task(traffic()) for _ in range(4)]
    try:
        await asyncio.sleep(0.2)
        progress = await backfill.slot_times(db, batch_size=3, on_batch=batches.append)
    finally:
        stop.set()
        await asyncio.gather(*runners)

    assert progress.batches >= 14, progress
    assert progress.updated > 0
    assert "held" in outcomes, "traffic ran during the backfill"
    assert await backfill.slot_times_left(db) == 0
    assert await fetch(database_url, _MISMATCHED) == []


async def test_the_backfill_refuses_an_empty_batch(api: Api) -> None:
    assert api.server.db is not None
    with pytest.raises(ValueError):
        await backfill.slot_times(api.server.db, batch_size=0)


async def test_a_slot_lasts_at_most_48_hours_and_the_longest_is_listed_by_a_window_it_overlaps(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    window = hours_from_now(24 * 10)
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT):
        await api.slot(spec.id, window, minutes=48 * 60 + 1)
    longest = await api.slot(spec.id, window - timedelta(hours=47, minutes=59), minutes=48 * 60)
    await api.slot(spec.id, window - timedelta(hours=50), minutes=60)  # ends before the window
    listed = await api.slots.ListSlots(
        spb.ListSlotsRequest(
            specialist_id=spec.id,
            window_start_time=ts(window),
            window_end_time=ts(window + timedelta(hours=1)),
        ),
        metadata=api.md,
    )
    assert [s.id for s in listed.slots] == [longest.id]
    # The database refuses a longer one whatever writes it.
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await fetch(
            database_url,
            "INSERT INTO time_slots (id, specialist_id, start_time, end_time)"
            " VALUES (gen_random_uuid(), $1, $2::timestamptz, $2::timestamptz + interval '48 hours 1 second')",
            uuid.UUID(spec.id),
            window + timedelta(days=5),
        )
    assert refused.value.constraint_name == "time_slots_length_bounded"
