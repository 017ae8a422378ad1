"""SlotService.SearchAvailableSlots end to end: free slots of active
specialists, earliest first across all of them, by service type or by
specialist ids, paged; free as HoldSlot sees it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from booking.v1 import appointment_pb2 as apb
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from storage import slots as slot_store
from tests.support import Api, expect_failure, hours_from_now, ts

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _request(start: datetime, end: datetime, **kw: object) -> spb.SearchAvailableSlotsRequest:
    return spb.SearchAvailableSlotsRequest(
        window_start_time=ts(start),
        window_end_time=ts(end),
        **kw,  # type: ignore[arg-type]
    )


async def _all(api: Api, request: spb.SearchAvailableSlotsRequest) -> list[spb.AvailableSlot]:
    out: list[spb.AvailableSlot] = []
    while True:
        page = await api.slots.SearchAvailableSlots(request, metadata=api.md)
        out += page.available_slots
        if not page.next_page_token:
            return out
        request.page_token = page.next_page_token


async def test_free_slots_of_a_service_type_earliest_first_across_specialists(api: Api) -> None:
    a = await api.specialist("Dr. A", "dentist")
    b = await api.specialist("Dr. B", "dentist")
    retired = await api.specialist("Dr. Retired", "dentist")
    surgeon = await api.specialist("Dr. S", "surgeon")
    base = hours_from_now(48)
    a_slots = [await api.slot(a.id, base + timedelta(hours=2 * i)) for i in range(4)]
    b_slots = [await api.slot(b.id, base + timedelta(hours=2 * i + 1)) for i in range(4)]
    await api.slot(retired.id, base)
    surgeon_slot = await api.slot(surgeon.id, base)
    await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id=retired.id, active=False),
            update_mask=FieldMask(paths=["active"]),
        ),
        metadata=api.md,
    )
    # Not free: held, booked, deleted. Outside the window: the last of B's.
    client, _ = await api.client()
    await client.hold(a_slots[1].id)
    booked = await client.hold(b_slots[1].id)
    await client.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=booked.id), metadata=client.md
    )
    await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=a_slots[2].id), metadata=api.md)

    request = _request(
        base - timedelta(minutes=1), base + timedelta(hours=7), service_type="dentist", page_size=2
    )
    found = await _all(client, request)

    expected = [a_slots[0], b_slots[0], b_slots[2], a_slots[3]]
    assert [f.slot.id for f in found] == [s.id for s in expected]
    assert all(f.slot.status == spb.SLOT_STATUS_AVAILABLE for f in found)
    assert {(f.slot.specialist_id, f.specialist_full_name, f.service_type) for f in found} == {
        (a.id, "Dr. A", "dentist"),
        (b.id, "Dr. B", "dentist"),
    }

    by_ids = await _all(
        client,
        _request(
            base - timedelta(minutes=1),
            base + timedelta(hours=8),
            specialist_ids=[b.id, retired.id, surgeon.id],
            page_size=1,
        ),
    )
    # The retired specialist's slot is left out; the surgeon's comes first.
    assert [f.slot.id for f in by_ids] == [surgeon_slot.id] + [
        s.id for s in (b_slots[0], b_slots[2], b_slots[3])
    ]


async def test_the_window_is_on_the_start_and_pages_keep_their_filters(api: Api) -> None:
    spec = await api.specialist()
    base = hours_from_now(30)
    slots = [await api.slot(spec.id, base + timedelta(minutes=30 * i)) for i in range(3)]
    # Starts inside the window though it ends after it; starts at its end: out.
    found = await _all(
        api,
        _request(
            base + timedelta(minutes=10), base + timedelta(minutes=60), specialist_ids=[spec.id]
        ),
    )
    assert [f.slot.id for f in found] == [slots[1].id]

    first = await api.slots.SearchAvailableSlots(
        _request(base, base + timedelta(hours=2), service_type="dentist", page_size=1),
        metadata=api.md,
    )
    assert first.next_page_token
    async with expect_failure(INVALID, "INVALID_ARGUMENT") as failed:
        await api.slots.SearchAvailableSlots(
            _request(
                base,
                base + timedelta(hours=3),
                service_type="dentist",
                page_size=1,
                page_token=first.next_page_token,
            ),
            metadata=api.md,
        )
    assert failed[0].violations == ["page_token"]


async def test_bad_searches_are_invalid_argument_with_field_violations(api: Api) -> None:
    base = hours_from_now(30)
    week = base + timedelta(days=7)
    cases: list[tuple[spb.SearchAvailableSlotsRequest, set[str]]] = [
        (_request(base, week), {"service_type"}),
        (
            _request(base, week, service_type="dentist", specialist_ids=["x"]),
            {"service_type", "specialist_ids[0]"},
        ),
        (
            _request(base, week, specialist_ids=[str(i) for i in range(101)]),
            {"specialist_ids"},
        ),
        (_request(week, base, service_type="dentist"), {"window_end_time"}),
        (_request(base, base + timedelta(days=93), service_type="dentist"), {"window_end_time"}),
        (_request(base, week, service_type="a\x00b", page_size=-1), {"service_type", "page_size"}),
        (
            spb.SearchAvailableSlotsRequest(service_type="dentist"),
            {"window_start_time", "window_end_time"},
        ),
        (_request(base, week, service_type="x" * 201), {"service_type"}),
    ]
    for request, fields in cases:
        async with expect_failure(INVALID, "INVALID_ARGUMENT") as failed:
            await api.slots.SearchAvailableSlots(request, metadata=api.md)
        assert set(failed[0].violations) == fields, request


class _Captured(Exception):
    """Raised by _Capture once it has the statement a search would run."""


class _Capture:
    """Stands in for Database: records the statement instead of running it."""

    def __init__(self) -> None:
        self.sql = ""
        self.args: tuple[Any, ...] = ()

    async def run(self, work: Any, **_: Any) -> Any:
        capture = self

        class Conn:
            async def fetch(self, sql: str, *args: Any) -> list[Any]:
                capture.sql, capture.args = sql, args
                raise _Captured

        await work(Conn())

    async def fetch(self, sql: str, *args: Any, **_: Any) -> list[Any]:
        self.sql, self.args = sql, args
        raise _Captured


async def _plan(conn: asyncpg.Connection, **search: Any) -> str:
    capture = _Capture()
    with pytest.raises(_Captured):
        await slot_store.search_available(capture, after=None, limit=50, client_id=None, **search)  # type: ignore[arg-type]
    rows = await conn.fetch("EXPLAIN (COSTS OFF) " + capture.sql, *capture.args)
    return "\n".join(r[0] for r in rows)


async def test_both_searches_are_served_by_an_index(api: Api, database_url: str) -> None:
    """On 200 specialists of four types with 100 slots each, neither form of
    the search reads the table in full (docs/performance.md has the plans at
    a million slots)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO specialists (id, full_name, service_type)"
            " SELECT gen_random_uuid(), 'Plan ' || s, 'plan-' || (s % 4)"
            " FROM generate_series(1, 200) s"
        )
        await conn.execute(
            "INSERT INTO time_slots (id, specialist_id, start_time, end_time)"
            " SELECT gen_random_uuid(), p.id,"
            "  date_trunc('hour', now()) + g * interval '1 hour',"
            "  date_trunc('hour', now()) + g * interval '1 hour' + interval '30 minutes'"
            " FROM specialists p, generate_series(1, 100) g"
        )
        await conn.execute("ANALYZE time_slots, specialists")
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM specialists LIMIT 3")]
        week = {
            "window_start": hours_from_now(24),
            "window_end": hours_from_now(24 + 7 * 24),
        }
        by_type = await _plan(conn, service_type="plan-1", specialist_ids=None, **week)
        by_ids = await _plan(conn, service_type=None, specialist_ids=ids, **week)
    finally:
        await conn.close()
    assert "Index Scan using time_slots_start on time_slots" in by_type, by_type
    assert "idx_time_slots_specialist_time" in by_ids, by_ids
    for plan in (by_type, by_ids):
        assert "Seq Scan on time_slots" not in plan, plan
