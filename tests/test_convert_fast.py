"""The hand-rolled conversions to protobuf agree with protobuf's own."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from booking.v1 import slot_pb2 as spb
from service import convert
from storage import models as m
from storage import slots as slot_store
from tests.support import Api, hours_from_now

MOMENTS = [
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2026, 3, 29, 1, 30, 0, 123_456, tzinfo=UTC),
    datetime(2026, 3, 29, 3, 30, 0, 1, tzinfo=timezone(timedelta(hours=2))),
    datetime(2026, 11, 1, 1, 30, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
]


@pytest.mark.parametrize("moment", MOMENTS, ids=str)
def test_timestamp_fields_match_protobuf(moment: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(moment)
    assert convert.timestamp(moment) == expected
    assert Timestamp(**convert.seconds_nanos(moment)) == expected


def test_naive_values_are_taken_as_utc() -> None:
    naive = datetime(2030, 5, 6, 7, 8, 9, 10)
    expected = Timestamp()
    expected.FromDatetime(naive.replace(tzinfo=UTC))
    assert convert.timestamp(naive) == expected


def test_slot_from_fields_equals_slot_built_field_by_field() -> None:
    start = datetime(2030, 1, 2, 9, 0, tzinfo=UTC)
    slot = m.Slot(
        id=uuid.uuid4(),
        specialist_id=uuid.uuid4(),
        start_time=start,
        end_time=start + timedelta(minutes=30),
        status=m.SlotStatus.HOLD,
        created_at=start - timedelta(days=1, microseconds=7),
        capacity=3,
        seats_available=0,
    )
    expected = spb.Slot(
        id=str(slot.id), specialist_id=str(slot.specialist_id), capacity=3, seats_available=0
    )
    expected.start_time.FromDatetime(slot.start_time)
    expected.end_time.FromDatetime(slot.end_time)
    expected.create_time.FromDatetime(slot.created_at)
    expected.status = spb.SLOT_STATUS_HOLD
    assert convert.slot(slot) == expected
    listed = spb.ListSlotsResponse(slots=[convert.slot_fields(slot)])
    assert list(listed.slots) == [expected]


async def test_slots_read_from_the_database_are_complete(api: Api) -> None:
    spec = await api.specialist()
    created = await api.slot(spec.id, hours_from_now(12))
    assert api.server.db is not None

    got = await slot_store.get(api.server.db, uuid.UUID(created.id))

    assert set(vars(got)) == {f.name for f in dataclasses.fields(m.Slot)}
    assert got.status is m.SlotStatus.AVAILABLE
    assert got == m.Slot(
        id=uuid.UUID(created.id),
        specialist_id=uuid.UUID(spec.id),
        start_time=created.start_time.ToDatetime(UTC),
        end_time=created.end_time.ToDatetime(UTC),
        status=m.SlotStatus.AVAILABLE,
        created_at=got.created_at,
    )
    assert convert.slot(got) == created
