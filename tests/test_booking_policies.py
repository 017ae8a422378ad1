"""Booking policies end to end: minimum notice, maximum advance and the
cancellation cutoff bind CLIENTs, inside the transition and against the
database clock; staff are exempt; defaults are server-wide, in the database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from booking.v1 import appointment_pb2 as apb
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from booking.v1 import waitlist_pb2 as wpb
from service import cli, logs
from storage import policies
from storage.database import Database
from storage.models import BookingPolicy, Role
from tests.support import Api, expect_failure, rollback_through, ts


def _in(**delta: float) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(**delta)


async def _policy(api: Api, specialist_id: str, **limits: int) -> sppb.Specialist:
    paths = [f"booking_policy.{name}" for name in limits]
    reply = await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(
                id=specialist_id, booking_policy=sppb.BookingPolicy(**limits)
            ),
            update_mask=FieldMask(paths=paths),
        ),
        metadata=api.md,
    )
    return reply.specialist


async def _confirmed(api: Api, owner: Api, slot_id: str) -> str:
    held = await owner.hold(slot_id)
    await owner.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=held.id), metadata=owner.md
    )
    return held.id


async def _slot_status(api: Api, slot_id: str) -> int:
    reply = await api.slots.GetSlot(spb.GetSlotRequest(id=slot_id), metadata=api.md)
    return reply.slot.status


async def test_a_client_cannot_hold_a_slot_inside_the_minimum_notice(api: Api) -> None:
    spec = await api.specialist()
    updated = await _policy(api, spec.id, min_notice_minutes=120)
    assert updated.booking_policy.min_notice_minutes == 120
    assert not updated.booking_policy.HasField("max_advance_days")
    client, _ = await api.client()
    soon = await api.slot(spec.id, _in(minutes=60))
    later = await api.slot(spec.id, _in(minutes=180))

    before = datetime.now(UTC)
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_BOOKING_WINDOW") as got:
        await client.hold(soon.id)
    after = datetime.now(UTC)
    meta = got[0].metadata
    assert meta["slot_id"] == soon.id
    assert meta["min_notice_minutes"] == "120"
    earliest = datetime.fromisoformat(meta["earliest_start_time"])
    # The database's clock: within this test's own window, give or take.
    assert before + timedelta(minutes=119) <= earliest <= after + timedelta(minutes=121)
    assert "latest_start_time" not in meta
    assert meta["earliest_start_time"] in got[0].message
    assert await _slot_status(api, soon.id) == spb.SLOT_STATUS_AVAILABLE

    assert (await client.hold(later.id)).status == apb.APPOINTMENT_STATUS_HOLD
    # Staff are exempt.
    operator = api.as_(await api.make_token(Role.OPERATOR))
    _, other_id = await api.client()
    assert (await operator.hold(soon.id, user_id=other_id)).user_id == other_id


async def test_a_client_cannot_hold_a_slot_beyond_the_maximum_advance(api: Api) -> None:
    spec = await api.specialist()
    await _policy(api, spec.id, max_advance_days=7)
    client, client_id = await api.client()
    far = await api.slot(spec.id, _in(days=10))
    near = await api.slot(spec.id, _in(days=6))
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_BOOKING_WINDOW") as got:
        await client.hold(far.id)
    latest = datetime.fromisoformat(got[0].metadata["latest_start_time"])
    assert abs(latest - _in(days=7)) < timedelta(minutes=5)
    assert got[0].metadata["max_advance_days"] == "7"
    assert "earliest_start_time" not in got[0].metadata
    await client.hold(near.id)
    # An admin books the far slot for the client.
    assert (await api.hold(far.id, user_id=client_id)).user_id == client_id


async def test_a_client_cannot_cancel_or_reschedule_a_confirmed_appointment_past_the_cutoff(
    api: Api,
) -> None:
    spec = await api.specialist()
    await _policy(api, spec.id, cancellation_cutoff_hours=24)
    client, _ = await api.client()
    soon = await _confirmed(api, client, (await api.slot(spec.id, _in(hours=3))).id)
    spare = await api.slot(spec.id, _in(hours=50))

    async with expect_failure(
        grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_CANCELLATION_WINDOW"
    ) as got:
        await client.appointments.CancelAppointment(
            apb.CancelAppointmentRequest(id=soon), metadata=client.md
        )
    meta = got[0].metadata
    assert meta["appointment_id"] == soon
    assert meta["cancellation_cutoff_hours"] == "24"
    assert meta["transition"] == "cancel"
    start = datetime.fromisoformat(meta["start_time"])
    assert datetime.fromisoformat(meta["cutoff_time"]) == start - timedelta(hours=24)

    async with expect_failure(
        grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_CANCELLATION_WINDOW"
    ) as got:
        await client.appointments.RescheduleAppointment(
            apb.RescheduleAppointmentRequest(id=soon, new_slot_id=spare.id), metadata=client.md
        )
    assert got[0].metadata["transition"] == "reschedule"
    unchanged = await api.appointments.GetAppointment(
        apb.GetAppointmentRequest(id=soon), metadata=api.md
    )
    assert unchanged.appointment.status == apb.APPOINTMENT_STATUS_CONFIRMED
    assert await _slot_status(api, spare.id) == spb.SLOT_STATUS_AVAILABLE

    # A hold is not bound by the cutoff; a confirmed appointment far enough
    # ahead is not either.
    held = await client.hold((await api.slot(spec.id, _in(hours=4))).id)
    await client.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=held.id), metadata=client.md
    )
    far = await _confirmed(api, client, (await api.slot(spec.id, _in(hours=48))).id)
    moved = await client.appointments.RescheduleAppointment(
        apb.RescheduleAppointmentRequest(id=far, new_slot_id=spare.id), metadata=client.md
    )
    assert moved.appointment.slot_id == spare.id
    await client.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=far), metadata=client.md
    )

    # An operator may still cancel the one inside the cutoff.
    operator = api.as_(await api.make_token(Role.OPERATOR))
    cancelled = await operator.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=soon, reason="clinic closed"), metadata=operator.md
    )
    assert cancelled.appointment.status == apb.APPOINTMENT_STATUS_CANCELLED


async def test_a_client_cannot_reschedule_into_a_slot_outside_the_booking_window(
    api: Api,
) -> None:
    spec = await api.specialist()
    await _policy(api, spec.id, min_notice_minutes=60)
    client, _ = await api.client()
    held = await client.hold((await api.slot(spec.id, _in(hours=5))).id)
    soon = await api.slot(spec.id, _in(minutes=30))
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_BOOKING_WINDOW"):
        await client.appointments.RescheduleAppointment(
            apb.RescheduleAppointmentRequest(id=held.id, new_slot_id=soon.id), metadata=client.md
        )
    moved = await api.appointments.RescheduleAppointment(
        apb.RescheduleAppointmentRequest(id=held.id, new_slot_id=soon.id), metadata=api.md
    )
    assert moved.appointment.slot_id == soon.id


async def test_a_refused_request_is_refused_again_on_replay(api: Api) -> None:
    spec = await api.specialist()
    await _policy(api, spec.id, min_notice_minutes=120)
    client, _ = await api.client()
    slot = await api.slot(spec.id, _in(minutes=60))
    request_id = str(uuid.uuid4())
    async with expect_failure(
        grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_BOOKING_WINDOW"
    ) as first:
        await client.hold(slot.id, request_id=request_id)
    # The limit is lifted, but a copy of the refused request gets the first answer.
    await _policy(api, spec.id, min_notice_minutes=0)
    async with expect_failure(
        grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_BOOKING_WINDOW"
    ) as again:
        await client.hold(slot.id, request_id=request_id)
    assert again[0].metadata == first[0].metadata
    # A new request is judged anew.
    held = await client.hold(slot.id, request_id=str(uuid.uuid4()))
    assert held.status == apb.APPOINTMENT_STATUS_HOLD


async def test_server_wide_defaults_apply_unless_the_specialist_sets_its_own(api: Api) -> None:
    assert api.server.db is not None
    db: Database = api.server.db
    assert await policies.defaults(db) == BookingPolicy(0, 0, 0)
    plain = await api.specialist()
    own = await api.specialist()
    await _policy(api, own.id, min_notice_minutes=0)
    client, _ = await api.client()
    plain_slot = await api.slot(plain.id, _in(minutes=30))
    own_slot = await api.slot(own.id, _in(minutes=30))

    changed = await policies.set_defaults(db, {"min_notice_minutes": 60})
    assert changed == BookingPolicy(60, 0, 0)
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_BOOKING_WINDOW") as got:
        await client.hold(plain_slot.id)
    assert got[0].metadata["min_notice_minutes"] == "60"
    # An explicit 0 is no limit, whatever the default.
    await client.hold(own_slot.id)

    # Naming a limit in the mask without a value returns it to the default.
    reverted = await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id=own.id),
            update_mask=FieldMask(paths=["booking_policy"]),
        ),
        metadata=api.md,
    )
    assert not reverted.specialist.booking_policy.HasField("min_notice_minutes")
    other = await api.slot(own.id, _in(minutes=5), minutes=20)
    async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_BOOKING_WINDOW"):
        await client.hold(other.id)


async def test_policy_limits_are_validated(api: Api) -> None:
    spec = await api.specialist()
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT) as got:
        await _policy(api, spec.id, min_notice_minutes=-1, max_advance_days=100_000)
    assert got[0].violations == [
        "specialist.booking_policy.min_notice_minutes",
        "specialist.booking_policy.max_advance_days",
    ]
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT) as got:
        await api.specialists.CreateSpecialist(
            sppb.CreateSpecialistRequest(
                full_name="Dr. X",
                service_type="x",
                booking_policy=sppb.BookingPolicy(cancellation_cutoff_hours=-3),
            ),
            metadata=api.md,
        )
    assert got[0].violations == ["booking_policy.cancellation_cutoff_hours"]
    created = await api.specialists.CreateSpecialist(
        sppb.CreateSpecialistRequest(
            full_name="Dr. Y",
            service_type="y",
            booking_policy=sppb.BookingPolicy(cancellation_cutoff_hours=12),
        ),
        metadata=api.md,
    )
    assert created.specialist.booking_policy.cancellation_cutoff_hours == 12
    assert not created.specialist.booking_policy.HasField("min_notice_minutes")


async def test_the_previous_releases_function_names_enforce_policies_for_clients(
    api: Api, database_url: str
) -> None:
    """A previous-release replica calls booking_hold_slot and booking_cancel
    as it always did; the actor's role decides whether the limits bind. The
    names exist until the contract step, so the database is taken back to
    the state of the rollout, before it."""
    assert rollback_through(database_url, "0050.contract-previous-release")
    spec = await api.specialist()
    await _policy(api, spec.id, min_notice_minutes=120, cancellation_cutoff_hours=24)
    _, client_id = await api.client()
    admin_id = await api.user_id()
    slot = await api.slot(spec.id, _in(minutes=60))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SET default_transaction_isolation = 'repeatable read'")
        hold = (
            "SELECT id, appointment_id FROM booking_hold_slot("
            "$1, $2, 'NORMAL', $3, '5 minutes', true, NULL)"
        )
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.fetchrow(
                hold, uuid.UUID(slot.id), uuid.UUID(client_id), uuid.UUID(client_id)
            )
        assert refused.value.sqlstate == "BK001"
        assert getattr(refused.value, "message", "") == "OUTSIDE_BOOKING_WINDOW"
        event = await conn.fetchrow(
            hold, uuid.UUID(slot.id), uuid.UUID(client_id), uuid.UUID(admin_id)
        )
        appointment_id = event["appointment_id"]
        await conn.fetchrow(
            "SELECT id FROM booking_confirm($1, NULL, $2, NULL)",
            appointment_id,
            uuid.UUID(admin_id),
        )
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.fetchrow(
                "SELECT id FROM booking_cancel($1, $2, $2, NULL, NULL)",
                appointment_id,
                uuid.UUID(client_id),
            )
        assert getattr(refused.value, "message", "") == "OUTSIDE_CANCELLATION_WINDOW"
        await conn.fetchrow(
            "SELECT id FROM booking_cancel($1, NULL, $2, NULL, NULL)",
            appointment_id,
            uuid.UUID(admin_id),
        )
    finally:
        await conn.close()


async def test_the_yes_no_check_agrees_with_the_refusal(api: Api, database_url: str) -> None:
    """booking_client_may_hold is what offers and availability ask."""
    spec = await api.specialist()
    await _policy(api, spec.id, min_notice_minutes=120, max_advance_days=3)
    slots = {
        "too soon": await api.slot(spec.id, _in(minutes=60)),
        "bookable": await api.slot(spec.id, _in(hours=5)),
        "too far": await api.slot(spec.id, _in(days=4)),
    }
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT s.id, booking_client_may_hold(s) AS ok FROM time_slots s"
            " WHERE specialist_id = $1",
            uuid.UUID(spec.id),
        )
    finally:
        await conn.close()
    may = {str(r["id"]): r["ok"] for r in rows}
    assert {name: may[s.id] for name, s in slots.items()} == {
        "too soon": False,
        "bookable": True,
        "too far": False,
    }
    client, _ = await api.client()
    for slot in slots.values():
        if may[slot.id]:
            await client.hold(slot.id)
        else:
            async with expect_failure(
                grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_BOOKING_WINDOW"
            ):
                await client.hold(slot.id)


def test_the_policy_defaults_command_shows_and_sets_them(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command configures logging onto this test's captured stderr, which
    # is closed after it: later tests' log lines would fail to write there.
    monkeypatch.setattr(logs, "configure", lambda level, as_json: None)
    assert cli.main(["policy-defaults", "--database-url", database_url]) == 0
    assert "min-notice-minutes: 0" in capsys.readouterr().out
    code = cli.main(
        ["policy-defaults", "--database-url", database_url, "--cancellation-cutoff-hours", "12"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "cancellation-cutoff-hours: 12" in out and "max-advance-days: 0" in out
    assert cli.main(["policy-defaults", "--database-url", database_url]) == 0
    assert "cancellation-cutoff-hours: 12" in capsys.readouterr().out
    bad = ["policy-defaults", "--database-url", database_url, "--max-advance-days", "-1"]
    assert cli.main(bad) == 2


async def test_the_waitlist_and_search_respect_a_clients_booking_window(api: Api) -> None:
    spec = await api.specialist("Dr. Notice", "policy-search")
    await _policy(api, spec.id, min_notice_minutes=120)
    waiter, waiter_id = await api.client()
    start, end = _in(minutes=1), _in(hours=10)
    joined = await waiter.waitlist.CreateWaitlistEntry(
        wpb.CreateWaitlistEntryRequest(
            specialist_id=spec.id,
            window_start_time=ts(start),
            window_end_time=ts(end),
        ),
        metadata=waiter.md,
    )
    entry_id = joined.waitlist_entry.id

    # Created slots are offered as they appear: the one inside the notice
    # is one the waiter could not hold, so it stays free for anyone else.
    soon = await api.slot(spec.id, _in(minutes=60))
    assert soon.status == spb.SLOT_STATUS_AVAILABLE
    got = await waiter.waitlist.GetWaitlistEntry(
        wpb.GetWaitlistEntryRequest(id=entry_id), metadata=waiter.md
    )
    assert got.waitlist_entry.status == wpb.WAITLIST_ENTRY_STATUS_ACTIVE
    later = await api.slot(spec.id, _in(hours=5))
    assert later.status == spb.SLOT_STATUS_HOLD
    got = await waiter.waitlist.GetWaitlistEntry(
        wpb.GetWaitlistEntryRequest(id=entry_id), metadata=waiter.md
    )
    assert got.waitlist_entry.status == wpb.WAITLIST_ENTRY_STATUS_OFFERED
    offered = await api.appointments.GetAppointment(
        apb.GetAppointmentRequest(id=got.waitlist_entry.appointment_id), metadata=api.md
    )
    assert (offered.appointment.user_id, offered.appointment.slot_id) == (
        waiter_id,
        later.id,
    )

    # Search shows a CLIENT only what it could hold; staff see every free slot.
    third = await api.slot(spec.id, _in(hours=7))
    search = spb.SearchAvailableSlotsRequest(
        specialist_ids=[spec.id], window_start_time=ts(start), window_end_time=ts(end)
    )
    client, _ = await api.client()
    for_client = await client.slots.SearchAvailableSlots(search, metadata=client.md)
    for_staff = await api.slots.SearchAvailableSlots(search, metadata=api.md)
    assert [a.slot.id for a in for_client.available_slots] == [third.id]
    assert [a.slot.id for a in for_staff.available_slots] == [soon.id, third.id]
