"""Recurring series: every occurrence checked as HoldSlot checks it, all or
nothing or as many as possible, in the specialist's zone (docs/seats.md)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc

from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from storage.models import Role
from tests.population import fetch, insert_clients
from tests.support import Api, expect_failure, hours_from_now, ts
from tests.test_concurrency import _race

ALL = apb.SERIES_MODE_ALL_OR_NOTHING
MANY = apb.SERIES_MODE_AS_MANY_AS_POSSIBLE


async def _weekly_slots(api: Api, specialist_id: str, first: datetime, weeks: int) -> list[str]:
    reply = await api.slots.BatchCreateSlots(
        spb.BatchCreateSlotsRequest(
            requests=[
                spb.CreateSlotRequest(
                    specialist_id=specialist_id,
                    start_time=ts(first + timedelta(weeks=k)),
                    end_time=ts(first + timedelta(weeks=k, minutes=45)),
                )
                for k in range(weeks)
            ]
        ),
        metadata=api.md,
    )
    return [s.id for s in reply.slots]


async def _series(api: Api, first_slot: str, rule: str, mode: Any, **kw: Any) -> Any:
    return await api.appointments.HoldSeries(
        apb.HoldSeriesRequest(first_slot_id=first_slot, recurrence=rule, mode=mode, **kw),
        metadata=api.md,
    )


def _first() -> datetime:
    return hours_from_now(48).replace(minute=0, second=0, microsecond=0)


async def _live(database_url: str, slots: list[str]) -> list[tuple[str, str | None]]:
    rows = await fetch(
        database_url,
        "SELECT a.time_slot_id::text AS slot, a.series_id::text AS series"
        " FROM appointments a JOIN time_slots s ON s.id = a.time_slot_id"
        " WHERE a.time_slot_id = ANY($1::uuid[]) AND a.status <> 'CANCELLED'"
        " ORDER BY s.start_time",
        [uuid.UUID(s) for s in slots],
    )
    return [(r["slot"], r["series"]) for r in rows]


async def test_a_series_whose_7th_of_10_is_taken_holds_nothing_all_or_nothing(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    slots = await _weekly_slots(api, spec.id, _first(), 10)
    await (await api.client())[0].hold(slots[6])
    client, _ = await api.client()

    refused = await _series(client, slots[0], "FREQ=WEEKLY;COUNT=10", ALL)

    assert not refused.held
    assert [o.slot_id for o in refused.occurrences] == slots
    assert [o.failure_reason for o in refused.occurrences] == [""] * 6 + ["SLOT_UNAVAILABLE"] + [
        ""
    ] * 3
    assert dict(refused.occurrences[6].failure_metadata) == {
        "slot_id": slots[6],
        "status": "HOLD",
    }
    assert not any(o.HasField("appointment") for o in refused.occurrences)
    assert [s for s, _ in await _live(database_url, slots)] == [slots[6]]
    events = await fetch(database_url, "SELECT count(*) AS n FROM appointment_events")
    assert events[0]["n"] == 1

    # As many as possible: the other nine, each an ordinary appointment.
    partial = await _series(client, slots[0], "FREQ=WEEKLY;COUNT=10", MANY)
    assert partial.held
    held = [o.appointment for o in partial.occurrences if o.HasField("appointment")]
    assert [a.slot_id for a in held] == slots[:6] + slots[7:]
    assert {a.series_id for a in held} == {partial.series_id}
    assert {a.status for a in held} == {apb.APPOINTMENT_STATUS_HOLD}
    assert partial.occurrences[6].failure_reason == "SLOT_UNAVAILABLE"
    kinds = await fetch(
        database_url, "SELECT event_type, count(*) AS n FROM appointment_events GROUP BY 1"
    )
    assert {r["event_type"]: r["n"] for r in kinds} == {"HELD": 10}


async def test_two_series_racing_for_the_same_occurrences_one_wins_entirely(
    api: Api, database_url: str
) -> None:
    operator = api.as_(await api.make_token(Role.OPERATOR))
    spec = await api.specialist()
    slots = await _weekly_slots(api, spec.id, _first(), 12)
    users = await insert_clients(database_url, 8)
    results: list[apb.HoldSeriesResponse] = []

    async def book(channel: grpc.aio.Channel, i: int) -> None:
        # Half start at the first week, half at the third: overlapping runs.
        stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
        reply = await stub.HoldSeries(
            apb.HoldSeriesRequest(
                first_slot_id=slots[0 if i % 2 == 0 else 2],
                recurrence="FREQ=WEEKLY;COUNT=10",
                mode=ALL,
                user_id=users[i],
            ),
            metadata=operator.md,
        )
        results.append(reply)

    codes = Counter(await _race(api, 8, book, channels=8))

    assert codes == {grpc.StatusCode.OK: 8}
    winners = [r for r in results if r.held]
    assert len(winners) == 1
    (winner,) = winners
    assert all(o.HasField("appointment") for o in winner.occurrences)
    live = await _live(database_url, slots)
    assert len(live) == 10
    assert {series for _, series in live} == {winner.series_id}


async def test_a_series_across_a_clock_change_keeps_local_time_in_two_zones(
    api: Api, database_url: str
) -> None:
    # Europe/Berlin moves on 2027-03-28, America/New_York on 2027-03-14: six
    # weekly Tuesdays at 10:00 from 2027-03-02 cross both.
    for zone in ("Europe/Berlin", "America/New_York"):
        tz = ZoneInfo(zone)
        reply = await api.specialists.CreateSpecialist(
            sppb.CreateSpecialistRequest(full_name="Dr. Zone", service_type="z", time_zone=zone),
            metadata=api.md,
        )
        spec = reply.specialist
        starts = [datetime(2027, 3, 2, 10, tzinfo=tz) + timedelta(days=7 * k) for k in range(6)]
        made = await api.slots.BatchCreateSlots(
            spb.BatchCreateSlotsRequest(
                requests=[
                    spb.CreateSlotRequest(
                        specialist_id=spec.id,
                        start_time=ts(s.astimezone(UTC)),
                        end_time=ts((s + timedelta(hours=1)).astimezone(UTC)),
                    )
                    for s in starts
                ]
            ),
            metadata=api.md,
        )
        slots = [s.id for s in made.slots]
        client, _ = await api.client()
        series = await _series(client, slots[0], "FREQ=WEEKLY;BYDAY=TU;COUNT=6", ALL)
        assert series.held, [o.failure_reason for o in series.occurrences]
        assert [o.slot_id for o in series.occurrences] == slots
        local = [
            o.start_time.ToDatetime(tzinfo=UTC).astimezone(tz).strftime("%H:%M")
            for o in series.occurrences
        ]
        assert local == ["10:00"] * 6
        offsets = {
            o.start_time.ToDatetime(tzinfo=UTC).astimezone(tz).utcoffset()
            for o in series.occurrences
        }
        assert len(offsets) == 2  # the series really crosses the change


async def test_copies_of_one_series_request_give_one_series(api: Api, database_url: str) -> None:
    spec = await api.specialist()
    slots = await _weekly_slots(api, spec.id, _first(), 4)
    client, _ = await api.client()
    request_id = str(uuid.uuid4())

    copies = await asyncio.gather(
        *(
            _series(client, slots[0], "FREQ=WEEKLY;COUNT=4", ALL, request_id=request_id)
            for _ in range(6)
        )
    )

    assert {c.series_id for c in copies} == {copies[0].series_id}
    assert all(c.held for c in copies)
    assert len(await _live(database_url, slots)) == 4
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED"):
        await _series(client, slots[0], "FREQ=WEEKLY;COUNT=3", ALL, request_id=request_id)


async def test_a_series_request_replays_its_first_failure(api: Api, database_url: str) -> None:
    """As every request id does (storage/sql/requests.sql): the refusal is
    the request's answer, even once its reason is gone; both where the
    function refuses (an inactive user) and where storage/ does before it
    (the first slot gone)."""
    spec = await api.specialist()
    slots = await _weekly_slots(api, spec.id, _first(), 3)
    user_id, _ = await api.make_user(Role.CLIENT)
    request_id = str(uuid.uuid4())
    await fetch(
        database_url, "UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(user_id)
    )
    for _ in range(2):
        async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "USER_INACTIVE"):
            await _series(
                api, slots[0], "FREQ=WEEKLY;COUNT=3", ALL, user_id=user_id, request_id=request_id
            )
        await fetch(
            database_url, "UPDATE users SET is_active = true WHERE id = $1", uuid.UUID(user_id)
        )
    gone_id = str(uuid.uuid4())
    await fetch(
        database_url, "UPDATE time_slots SET deleted_at = now() WHERE id = $1", uuid.UUID(slots[0])
    )
    for _ in range(2):
        async with expect_failure(grpc.StatusCode.NOT_FOUND, "SLOT_NOT_FOUND"):
            await _series(
                api, slots[0], "FREQ=WEEKLY;COUNT=3", ALL, user_id=user_id, request_id=gone_id
            )
        await fetch(
            database_url,
            "UPDATE time_slots SET deleted_at = NULL WHERE id = $1",
            uuid.UUID(slots[0]),
        )
    # A new id is a new request, and it succeeds.
    held = await _series(
        api, slots[0], "FREQ=WEEKLY;COUNT=3", ALL, user_id=user_id, request_id=str(uuid.uuid4())
    )
    assert held.held
    keys = await fetch(
        database_url,
        "SELECT error_reason FROM idempotency_keys WHERE request_id = ANY($1::uuid[])"
        " ORDER BY error_reason",
        [uuid.UUID(request_id), uuid.UUID(gone_id)],
    )
    assert [k["error_reason"] for k in keys] == ["SLOT_NOT_FOUND", "USER_INACTIVE"]


async def test_a_refused_series_replays_its_report_once_the_slot_frees(api: Api) -> None:
    spec = await api.specialist()
    slots = await _weekly_slots(api, spec.id, _first(), 3)
    blocker, _ = await api.client()
    taken = await blocker.hold(slots[1])
    client, _ = await api.client()
    request_id = str(uuid.uuid4())
    refused = await _series(client, slots[0], "FREQ=WEEKLY;COUNT=3", ALL, request_id=request_id)
    assert not refused.held
    await blocker.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=taken.id), metadata=blocker.md
    )
    again = await _series(client, slots[0], "FREQ=WEEKLY;COUNT=3", ALL, request_id=request_id)
    assert again.series_id == refused.series_id and not again.held
    # One caller's request ids are one key space, whatever the operation.
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED"):
        await client.hold(slots[2], request_id=request_id)


async def test_confirm_and_cancel_a_whole_series_or_one_occurrence(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    slots = await _weekly_slots(api, spec.id, _first(), 5)
    spare = await api.slot(spec.id, _first() + timedelta(days=2))
    client, _ = await api.client()
    series = await _series(client, slots[0], "FREQ=WEEKLY;COUNT=4", ALL)
    assert series.held
    ids = [o.appointment.id for o in series.occurrences]
    # The events are ordinary HELD events whose appointments carry the series.
    listed = await client.appointments.ListAppointmentEvents(
        apb.ListAppointmentEventsRequest(filter=apb.AppointmentEventFilter(appointment_id=ids[0])),
        metadata=client.md,
    )
    (held,) = listed.events
    assert held.type == apb.APPOINTMENT_EVENT_TYPE_HELD
    assert held.appointment.series_id == series.series_id

    # One occurrence: cancelled as any appointment; another moved.
    await client.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=ids[1]), metadata=client.md
    )
    moved = await client.appointments.RescheduleAppointment(
        apb.RescheduleAppointmentRequest(id=ids[2], new_slot_id=spare.id), metadata=client.md
    )
    assert moved.appointment.series_id == series.series_id

    confirmed = await client.appointments.ConfirmSeries(
        apb.ConfirmSeriesRequest(series_id=series.series_id), metadata=client.md
    )
    assert [a.status for a in confirmed.appointments] == [
        apb.APPOINTMENT_STATUS_CONFIRMED,
        apb.APPOINTMENT_STATUS_CONFIRMED,
        apb.APPOINTMENT_STATUS_CANCELLED,
        apb.APPOINTMENT_STATUS_CONFIRMED,
    ]
    other, _ = await api.client()
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "SERIES_NOT_FOUND"):
        await other.appointments.CancelSeries(
            apb.CancelSeriesRequest(series_id=series.series_id), metadata=other.md
        )
    cancelled = await client.appointments.CancelSeries(
        apb.CancelSeriesRequest(series_id=series.series_id, reason="moving away"),
        metadata=client.md,
    )
    assert {a.status for a in cancelled.appointments} == {apb.APPOINTMENT_STATUS_CANCELLED}
    kinds = await fetch(
        database_url, "SELECT event_type, count(*) AS n FROM appointment_events GROUP BY 1"
    )
    assert {r["event_type"]: r["n"] for r in kinds} == {
        "HELD": 4,
        "CANCELLED": 4,
        "RESCHEDULED": 1,
        "CONFIRMED": 3,
    }


async def test_confirm_series_with_a_request_id_replays_its_first_refusal(
    api: Api, database_url: str
) -> None:
    """As every transition: the refusal (a lapsed hold) is the request's
    answer even once its reason is gone; a new id confirms."""
    spec = await api.specialist()
    slots = await _weekly_slots(api, spec.id, _first(), 3)
    client, _ = await api.client()
    series = await _series(client, slots[0], "FREQ=WEEKLY;COUNT=3", ALL)
    ids = [o.appointment.id for o in series.occurrences]
    await fetch(
        database_url,
        "UPDATE appointments SET expires_at = now() - interval '1 minute' WHERE id = $1",
        uuid.UUID(ids[1]),
    )
    request = apb.ConfirmSeriesRequest(series_id=series.series_id, request_id=str(uuid.uuid4()))
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "HOLD_EXPIRED"):
        await client.appointments.ConfirmSeries(request, metadata=client.md)
    await client.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=ids[1]), metadata=client.md
    )
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "HOLD_EXPIRED"):
        await client.appointments.ConfirmSeries(request, metadata=client.md)
    request.request_id = str(uuid.uuid4())
    confirmed = await client.appointments.ConfirmSeries(request, metadata=client.md)
    assert [a.status for a in confirmed.appointments] == [
        apb.APPOINTMENT_STATUS_CONFIRMED,
        apb.APPOINTMENT_STATUS_CANCELLED,
        apb.APPOINTMENT_STATUS_CONFIRMED,
    ]


async def test_copies_of_one_series_transition_give_one_answer(api: Api, database_url: str) -> None:
    """Copies racing (real concurrent clients) confirm, then cancel, each
    occurrence once; the id's key is the series' result, not an
    occurrence's event; another series under the same id is a reused id."""
    spec = await api.specialist()
    slots = await _weekly_slots(api, spec.id, _first(), 4)
    client, _ = await api.client()
    series = await _series(client, slots[0], "FREQ=WEEKLY;COUNT=4", ALL)
    confirm_id, cancel_id = str(uuid.uuid4()), str(uuid.uuid4())

    confirms = await asyncio.gather(
        *(
            client.appointments.ConfirmSeries(
                apb.ConfirmSeriesRequest(series_id=series.series_id, request_id=confirm_id),
                metadata=client.md,
            )
            for _ in range(6)
        )
    )
    assert all(
        {a.status for a in c.appointments} == {apb.APPOINTMENT_STATUS_CONFIRMED} for c in confirms
    )
    cancels = await asyncio.gather(
        *(
            client.appointments.CancelSeries(
                apb.CancelSeriesRequest(
                    series_id=series.series_id, reason="moving", request_id=cancel_id
                ),
                metadata=client.md,
            )
            for _ in range(6)
        )
    )
    assert all(
        {a.status for a in c.appointments} == {apb.APPOINTMENT_STATUS_CANCELLED} for c in cancels
    )
    kinds = await fetch(
        database_url, "SELECT event_type, count(*) AS n FROM appointment_events GROUP BY 1"
    )
    assert {r["event_type"]: r["n"] for r in kinds} == {"HELD": 4, "CONFIRMED": 4, "CANCELLED": 4}
    keys = await fetch(
        database_url,
        "SELECT operation, result->>'count' AS n, event_id FROM idempotency_keys"
        " WHERE request_id = ANY($1::uuid[]) ORDER BY operation",
        [uuid.UUID(confirm_id), uuid.UUID(cancel_id)],
    )
    assert [(k["operation"], k["n"], k["event_id"]) for k in keys] == [
        ("CancelSeries", "4", None),
        ("ConfirmSeries", "4", None),
    ]
    other = await _series(client, slots[0], "FREQ=WEEKLY;COUNT=1", MANY)
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED"):
        await client.appointments.ConfirmSeries(
            apb.ConfirmSeriesRequest(series_id=other.series_id, request_id=confirm_id),
            metadata=client.md,
        )


async def test_series_bounds_and_bad_recurrences(api: Api) -> None:
    spec = await api.specialist()
    (first,) = await _weekly_slots(api, spec.id, _first(), 1)
    async with expect_failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "SERIES_TOO_LARGE"):
        await _series(api, first, "FREQ=DAILY;COUNT=500", ALL)
    async with expect_failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "SERIES_TOO_LARGE"):
        await _series(api, first, "FREQ=DAILY;UNTIL=20991231", ALL)
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT, "SERIES_TOO_LONG"):
        await _series(api, first, "FREQ=WEEKLY;INTERVAL=20;COUNT=30", ALL)
    for bad in ("FREQ=MONTHLY;COUNT=2", "FREQ=WEEKLY", "FREQ=WEEKLY;COUNT=0", "BYDAY=XX"):
        async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"):
            await _series(api, first, bad, ALL)
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"):
        await _series(api, first, "FREQ=WEEKLY;COUNT=2", apb.SERIES_MODE_UNSPECIFIED)
