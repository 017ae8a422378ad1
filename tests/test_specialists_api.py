"""SpecialistService end to end over a real gRPC channel and a real
PostgreSQL: success paths, NOT_FOUND, filters and pagination. (Malformed
requests are in test_invalid_input.py.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from booking.v1 import specialist_pb2 as sppb
from tests.support import Api, expect_failure

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
MISSING_ID = "00000000-0000-4000-8000-000000000000"


async def _get(api: Api, specialist_id: str) -> sppb.Specialist:
    reply = await api.specialists.GetSpecialist(
        sppb.GetSpecialistRequest(id=specialist_id), metadata=api.md
    )
    return reply.specialist


async def _update(api: Api, patch: sppb.Specialist, paths: list[str]) -> sppb.Specialist:
    reply = await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(specialist=patch, update_mask=FieldMask(paths=paths)),
        metadata=api.md,
    )
    return reply.specialist


async def _list(api: Api, **kw: Any) -> sppb.ListSpecialistsResponse:
    return await api.specialists.ListSpecialists(
        sppb.ListSpecialistsRequest(**kw),
        metadata=api.md,
    )


async def _walk(api: Api, page_size: int, **filters: Any) -> tuple[list[sppb.Specialist], int]:
    items: list[sppb.Specialist] = []
    token, pages = "", 0
    while True:
        page = await _list(api, page_size=page_size, page_token=token, **filters)
        pages += 1
        assert len(page.specialists) <= page_size
        items.extend(page.specialists)
        token = page.next_page_token
        if not token:
            return items, pages
        assert pages < 100, "pagination does not terminate"


def _ids(items: Iterable[Any]) -> list[str]:
    return [s.id for s in items]


def _stamp(s: sppb.Specialist) -> tuple[int, int]:
    return (s.update_time.seconds, s.update_time.nanos)


async def test_create_specialist_trims_the_text_and_starts_active(api: Api) -> None:
    created = await api.specialist("  Dr. Ada Lovelace  ", " cardiologist ")
    assert uuid.UUID(created.id)
    assert created.full_name == "Dr. Ada Lovelace"
    assert created.service_type == "cardiologist"
    assert created.active is True
    assert created.HasField("create_time") and created.HasField("update_time")
    assert await _get(api, created.id) == created


async def test_create_specialist_keeps_unicode_names(api: Api) -> None:
    created = await api.specialist("Dr. Zoë Łukasiewicz-Ōtani", "стоматолог")
    got = await _get(api, created.id)
    assert (got.full_name, got.service_type) == ("Dr. Zoë Łukasiewicz-Ōtani", "стоматолог")


async def test_update_specialist_changes_only_the_masked_fields(api: Api) -> None:
    created = await api.specialist("Dr. A", "dentist")
    patch = sppb.Specialist(id=created.id, full_name="  Dr. B  ", service_type="surgeon")
    updated = await _update(api, patch, ["full_name"])
    assert (updated.full_name, updated.service_type, updated.active) == ("Dr. B", "dentist", True)
    assert _stamp(updated) > _stamp(created)
    assert updated.create_time == created.create_time
    updated = await _update(api, patch, ["service_type"])
    assert (updated.full_name, updated.service_type) == ("Dr. B", "surgeon")
    assert await _get(api, created.id) == updated


async def test_update_specialist_deactivates_and_reactivates(api: Api) -> None:
    created = await api.specialist()
    off = await _update(api, sppb.Specialist(id=created.id, active=False), ["active"])
    assert off.active is False
    assert (await _get(api, created.id)).active is False
    on = await _update(api, sppb.Specialist(id=created.id, active=True), ["active"])
    assert on.active is True
    assert on.full_name == created.full_name


async def test_get_or_update_unknown_specialist_is_not_found(api: Api) -> None:
    async with expect_failure(NOT_FOUND, "SPECIALIST_NOT_FOUND") as box:
        await _get(api, MISSING_ID)
    assert box[0].metadata.get("id") == MISSING_ID
    async with expect_failure(NOT_FOUND, "SPECIALIST_NOT_FOUND"):
        await _update(api, sppb.Specialist(id=MISSING_ID, full_name="X"), ["full_name"])
    assert (await _list(api)).specialists == []


async def test_list_specialists_filters_by_service_type_and_active(api: Api) -> None:
    d1 = await api.specialist("D1", "dentist")
    d2 = await api.specialist("D2", "dentist")
    s1 = await api.specialist("S1", "surgeon")
    await _update(api, sppb.Specialist(id=d2.id, active=False), ["active"])

    assert _ids((await _list(api)).specialists) == [d1.id, d2.id, s1.id]
    assert _ids((await _list(api, service_type="dentist")).specialists) == [d1.id, d2.id]
    assert _ids((await _list(api, service_type="surgeon")).specialists) == [s1.id]
    assert _ids((await _list(api, service_type="plumber")).specialists) == []
    assert _ids((await _list(api, active=True)).specialists) == [d1.id, s1.id]
    assert _ids((await _list(api, active=False)).specialists) == [d2.id]
    both = await _list(api, service_type="dentist", active=True)
    assert _ids(both.specialists) == [d1.id]


async def test_list_specialists_page_size_zero_means_fifty(api: Api) -> None:
    await asyncio.gather(*(api.specialist(f"Dr. {i}") for i in range(51)))
    first = await _list(api, page_size=0)
    assert len(first.specialists) == 50
    assert first.next_page_token
    rest = await _list(api, page_token=first.next_page_token)
    assert len(rest.specialists) == 1
    assert rest.next_page_token == ""
    everything = await _list(api, page_size=5000)
    assert len(everything.specialists) == 51
    assert everything.next_page_token == ""
    assert _ids(first.specialists) + _ids(rest.specialists) == _ids(everything.specialists)


async def test_walking_specialist_pages_returns_every_one_once_in_creation_order(
    api: Api,
) -> None:
    created = [
        await api.specialist(f"Dr. {i}", "dentist" if i % 2 else "surgeon") for i in range(9)
    ]
    for size in (1, 2, 4, 9):
        walked, pages = await _walk(api, size)
        assert _ids(walked) == _ids(created), f"page_size={size}"
        assert pages == -(-9 // size)
    dentists, _ = await _walk(api, 2, service_type="dentist")
    assert _ids(dentists) == [s.id for s in created if s.service_type == "dentist"]


async def test_specialist_page_token_reused_with_changed_filters_is_invalid_argument(
    api: Api,
) -> None:
    for i in range(3):
        await api.specialist(f"Dr. {i}", "dentist")
    first = await _list(api, page_size=1, service_type="dentist")
    assert first.next_page_token
    changed: list[dict[str, Any]] = [
        {},
        {"service_type": "surgeon"},
        {"service_type": "dentist", "active": True},
        {"service_type": "Dentist"},
    ]
    for filters in changed:
        async with expect_failure(INVALID) as box:
            await _list(api, page_size=1, page_token=first.next_page_token, **filters)
        assert box[0].violations == ["page_token"], filters
    second = await _list(api, page_size=1, page_token=first.next_page_token, service_type="dentist")
    assert _ids(second.specialists) != _ids(first.specialists)
