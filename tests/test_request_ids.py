"""One request-id mechanism for the transitions, the waitlist and schedules.

CreateWaitlistEntry and MaterializeSchedule keep their request ids where the
transitions do (storage/sql/requests.sql): the same replay (a failure too),
the same per-caller key space, the same retention, and ids stored by the
mechanisms they had before migration 0013 keep replaying after it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, timedelta

import asyncpg
import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from booking.v1 import appointment_pb2 as apb
from booking.v1 import schedule_pb2 as pb
from booking.v1 import specialist_pb2 as sppb
from booking.v1 import waitlist_pb2 as wpb
from storage import appointments, migrate
from storage.models import Role
from tests.support import Api, expect_failure, hours_from_now, rollback_through, running_server, ts

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def _join(
    specialist_id: str, hours: float, request_id: str, user_id: str = ""
) -> wpb.CreateWaitlistEntryRequest:
    start = hours_from_now(hours)
    return wpb.CreateWaitlistEntryRequest(
        user_id=user_id,
        specialist_id=specialist_id,
        window_start_time=ts(start),
        window_end_time=ts(start + timedelta(hours=2)),
        request_id=request_id,
    )


async def _set_active(api: Api, specialist_id: str, active: bool) -> None:
    await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id=specialist_id, active=active),
            update_mask=FieldMask(paths=["active"]),
        ),
        metadata=api.md,
    )


async def test_a_waitlist_request_replays_its_first_failure(api: Api) -> None:
    """As a transition does: the refusal is the request's answer, even once
    the reason is gone."""
    spec = await api.specialist()
    await _set_active(api, spec.id, False)
    request_id = str(uuid.uuid4())
    request = _join(spec.id, 30, request_id)
    async with expect_failure(PRECONDITION, "SPECIALIST_INACTIVE"):
        await api.waitlist.CreateWaitlistEntry(request, metadata=api.md)
    await _set_active(api, spec.id, True)
    async with expect_failure(PRECONDITION, "SPECIALIST_INACTIVE"):
        await api.waitlist.CreateWaitlistEntry(request, metadata=api.md)
    # A new id is a new request.
    joined = await api.waitlist.CreateWaitlistEntry(
        _join(spec.id, 30, str(uuid.uuid4())), metadata=api.md
    )
    assert joined.waitlist_entry.id


async def test_one_callers_request_ids_are_one_key_space(api: Api) -> None:
    """A caller's id names one request, whatever the operation; another
    caller's same id is its own."""
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(40))
    client, _ = await api.client()
    other, _ = await api.client()
    request_id = str(uuid.uuid4())
    await client.waitlist.CreateWaitlistEntry(_join(spec.id, 60, request_id), metadata=client.md)
    async with expect_failure(INVALID, "REQUEST_ID_REUSED"):
        await client.appointments.HoldSlot(
            apb.HoldSlotRequest(slot_id=slot.id, request_id=request_id), metadata=client.md
        )
    held = await other.appointments.HoldSlot(
        apb.HoldSlotRequest(slot_id=slot.id, request_id=request_id), metadata=other.md
    )
    assert held.appointment.id
    theirs = await other.waitlist.CreateWaitlistEntry(
        _join(spec.id, 90, str(uuid.uuid4())), metadata=other.md
    )
    assert theirs.waitlist_entry.id


async def test_waitlist_and_schedule_ids_are_forgotten_with_the_others(
    api: Api, database_url: str
) -> None:
    spec = await api.specialist()
    await api.schedules.UpdateSchedule(
        pb.UpdateScheduleRequest(
            specialist_id=spec.id,
            schedule=pb.Schedule(
                rules=[
                    pb.WeeklyRule(
                        weekday=pb.WEEKDAY_MONDAY,
                        start_time="09:00",
                        end_time="10:00",
                        slot_minutes=30,
                    )
                ]
            ),
        ),
        metadata=api.md,
    )
    join_id, run_id = str(uuid.uuid4()), str(uuid.uuid4())
    first = await api.waitlist.CreateWaitlistEntry(_join(spec.id, 30, join_id), metadata=api.md)
    materialize = pb.MaterializeScheduleRequest(
        specialist_id=spec.id, start_date="2030-03-04", end_date="2030-03-05", request_id=run_id
    )
    made = await api.schedules.MaterializeSchedule(materialize, metadata=api.md)
    assert made.created_slots
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '2 days'"
            " WHERE request_id = ANY($1::uuid[])",
            [uuid.UUID(join_id), uuid.UUID(run_id)],
        )
    finally:
        await conn.close()
    assert api.server.db is not None
    assert await appointments.forget_request_ids(api.server.db, timedelta(hours=24), 100) == 2
    # Forgotten: both ids now run as new requests.
    again = await api.waitlist.CreateWaitlistEntry(_join(spec.id, 30, join_id), metadata=api.md)
    assert again.waitlist_entry.id != first.waitlist_entry.id
    rerun = await api.schedules.MaterializeSchedule(materialize, metadata=api.md)
    assert not rerun.created_slots and rerun.skipped_slots


async def test_ids_stored_before_the_upgrade_keep_replaying(database_url: str) -> None:
    async with running_server(database_url) as server, Api.connect(server) as api:
        token = api.token
        actor = uuid.UUID(await api.user_id())
        spec = await api.specialist()
        client_id, _ = await api.make_user(Role.CLIENT)
    # The previous mechanisms' schema, and ids stored by them.
    rollback_through(database_url, "0013.one-request-id-mechanism")
    join_id, run_id = uuid.uuid4(), uuid.uuid4()
    request = _join(spec.id, 30, str(join_id), user_id=client_id)
    conn = await asyncpg.connect(
        database_url, server_settings={"default_transaction_isolation": "repeatable read"}
    )
    try:
        entry_id = await conn.fetchval(
            "SELECT id FROM booking_create_waitlist_entry("
            "p_user_id => $1, p_specialist_id => $2, p_service_type => NULL,"
            " p_window_start => $3, p_window_end => $4, p_priority => 'NORMAL',"
            " p_offer_ttl => interval '5 minutes', p_actor_id => $5, p_request_id => $6)",
            uuid.UUID(client_id),
            uuid.UUID(spec.id),
            request.window_start_time.ToDatetime().replace(tzinfo=UTC),
            request.window_end_time.ToDatetime().replace(tzinfo=UTC),
            actor,
            join_id,
        )
        report = {
            "time_zone": "Europe/Berlin",
            "tz_version": "stored",
            "created": [],
            "skipped": [],
        }
        await conn.execute(
            "INSERT INTO schedule_runs (actor_id, request_id, specialist_id, fingerprint, report)"
            " VALUES ($1, $2, $3, $4, $5::jsonb)",
            actor,
            run_id,
            uuid.UUID(spec.id),
            hashlib.md5(f"{spec.id}|2030-03-04|2030-03-05".encode()).hexdigest(),
            json.dumps(report),
        )
    finally:
        await conn.close()
    assert "0013.one-request-id-mechanism" in migrate.apply(database_url, contract=True)

    async with running_server(database_url) as server, Api.connect(server) as fresh:
        api = fresh.as_(token)
        replayed = await api.waitlist.CreateWaitlistEntry(request, metadata=api.md)
        assert replayed.waitlist_entry.id == str(entry_id)
        materialize = pb.MaterializeScheduleRequest(
            specialist_id=spec.id,
            start_date="2030-03-04",
            end_date="2030-03-05",
            request_id=str(run_id),
        )
        report_again = await api.schedules.MaterializeSchedule(materialize, metadata=api.md)
        assert report_again.tz_version == "stored"
        materialize.end_date = "2030-03-06"
        async with expect_failure(INVALID, "REQUEST_ID_REUSED"):
            await api.schedules.MaterializeSchedule(materialize, metadata=api.md)
        request.window_end_time.CopyFrom(ts(hours_from_now(35)))
        async with expect_failure(INVALID, "REQUEST_ID_REUSED"):
            await api.waitlist.CreateWaitlistEntry(request, metadata=api.md)


async def test_series_ids_stored_before_the_upgrade_keep_replaying(database_url: str) -> None:
    """Series kept their request ids on their rows before migration 0041;
    those become keys, so a copy still gets the series."""
    first = hours_from_now(72).replace(minute=0, second=0, microsecond=0)
    async with running_server(database_url) as server, Api.connect(server) as api:
        token = api.token
        actor = uuid.UUID(await api.user_id())
        spec = await api.specialist()
        client_id, _ = await api.make_user(Role.CLIENT)
        slot_ids = [(await api.slot(spec.id, first + timedelta(days=k))).id for k in range(2)]
    rollback_through(database_url, "0041.series-request-ids")
    request_id = uuid.uuid4()
    conn = await asyncpg.connect(
        database_url, server_settings={"default_transaction_isolation": "repeatable read"}
    )
    try:
        series_id = await conn.fetchval(
            "SELECT id FROM booking_hold_series("
            "p_first_slot_id => $1, p_user_id => $2, p_priority => 'NORMAL', p_actor_id => $3,"
            " p_hold_ttl => interval '5 minutes', p_check_user_overlap => true,"
            " p_request_id => $4, p_policy_exempt => true, p_party_size => 1,"
            " p_recurrence => 'FREQ=DAILY;COUNT=2', p_all_or_nothing => true, p_starts => $5)",
            uuid.UUID(slot_ids[0]),
            uuid.UUID(client_id),
            actor,
            request_id,
            [first, first + timedelta(days=1)],
        )
    finally:
        await conn.close()
    assert "0041.series-request-ids" in migrate.apply(database_url, contract=True)

    async with running_server(database_url) as server, Api.connect(server) as fresh:
        api = fresh.as_(token)
        request = apb.HoldSeriesRequest(
            first_slot_id=slot_ids[0],
            recurrence="FREQ=DAILY;COUNT=2",
            mode=apb.SERIES_MODE_ALL_OR_NOTHING,
            user_id=client_id,
            request_id=str(request_id),
        )
        replayed = await api.appointments.HoldSeries(request, metadata=api.md)
        assert replayed.series_id == str(series_id) and replayed.held
        assert [o.slot_id for o in replayed.occurrences] == slot_ids
        request.mode = apb.SERIES_MODE_AS_MANY_AS_POSSIBLE
        async with expect_failure(INVALID, "REQUEST_ID_REUSED"):
            await api.appointments.HoldSeries(request, metadata=api.md)
