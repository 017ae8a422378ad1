"""SlotService."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from uuid import UUID

from booking.v1 import slot_pb2 as pb
from booking.v1 import slot_pb2_grpc
from service import auth, convert, pagination
from service.grpc_types import Context
from service.servicers.appointments import MAX_PARTY_SIZE
from service.validation import Validator
from storage import slots as store
from storage.database import Database
from storage.models import Role, Slot, SlotStatus
from storage.slots import NewSlot

MAX_BATCH = 1000
MAX_SEARCH_SPECIALISTS = 100
MAX_SEARCH_WINDOW = timedelta(days=92)
MAX_SERVICE_TYPE = 200
# Seats per slot (docs/seats.md).
MAX_CAPACITY = 1000


def _capacity(v: Validator, field: str, value: int, *, required: bool) -> int | None:
    if value == 0 and not required:
        return 1
    if not 1 <= value <= MAX_CAPACITY:
        v.fail(field, f"must be 1 to {MAX_CAPACITY}" + ("" if required else ", or 0 for 1"))
        return None
    return value


def _new_slot(v: Validator, prefix: str, request: pb.CreateSlotRequest) -> NewSlot | None:
    specialist_id = v.uuid(f"{prefix}specialist_id", request.specialist_id)
    start = v.timestamp(f"{prefix}start_time", request, "start_time", required=True)
    end = v.timestamp(f"{prefix}end_time", request, "end_time", required=True)
    capacity = _capacity(v, f"{prefix}capacity", request.capacity, required=False)
    if start is not None and end is not None and start >= end:
        v.fail(f"{prefix}end_time", "must be after start_time")
        return None
    if start is not None and end is not None and end - start > store.MAX_SLOT_LENGTH:
        hours = store.MAX_SLOT_LENGTH // timedelta(hours=1)
        v.fail(f"{prefix}end_time", f"at most {hours} hours after start_time")
        return None
    if specialist_id is None or start is None or end is None or capacity is None:
        return None
    return NewSlot(specialist_id, start, end, capacity)


class SlotService(slot_pb2_grpc.SlotServiceServicer):
    def __init__(self, db: Database, on_commit: Callable[[], None] | None = None) -> None:
        self.db = db
        # Wakes the event watchers: a new slot may have gone to a waiter.
        self._on_commit = on_commit

    def _created(self, slots: list[Slot]) -> None:
        if self._on_commit is not None and any(s.status is SlotStatus.HOLD for s in slots):
            self._on_commit()

    async def CreateSlot(
        self, request: pb.CreateSlotRequest, context: Context
    ) -> pb.CreateSlotResponse:
        v = Validator()
        new = _new_slot(v, "", request)
        v.check()
        assert new is not None
        (created,) = await store.create_many(self.db, [new])
        self._created([created])
        return pb.CreateSlotResponse(slot=convert.slot(created))

    async def BatchCreateSlots(
        self, request: pb.BatchCreateSlotsRequest, context: Context
    ) -> pb.BatchCreateSlotsResponse:
        v = Validator()
        if not request.requests:
            v.fail("requests", "required: at least one slot")
        elif len(request.requests) > MAX_BATCH:
            v.fail("requests", f"at most {MAX_BATCH} slots per batch")
        else:
            new = [_new_slot(v, f"requests[{i}].", r) for i, r in enumerate(request.requests)]
        v.check()
        created = await store.create_many(self.db, [n for n in new if n is not None])
        self._created(created)
        return pb.BatchCreateSlotsResponse(slots=[convert.slot_fields(s) for s in created])

    async def GetSlot(self, request: pb.GetSlotRequest, context: Context) -> pb.GetSlotResponse:
        v = Validator()
        slot_id = v.uuid("id", request.id)
        v.check()
        return pb.GetSlotResponse(slot=convert.slot(await store.get(self.db, slot_id)))

    async def ListSlots(
        self, request: pb.ListSlotsRequest, context: Context
    ) -> pb.ListSlotsResponse:
        v = Validator()
        size = v.page_size(request.page_size)
        specialist_id = v.uuid("specialist_id", request.specialist_id, required=False)
        start = v.timestamp("window_start_time", request, "window_start_time", required=False)
        end = v.timestamp("window_end_time", request, "window_end_time", required=False)
        v.window(start, end, "window_start_time", "window_end_time")
        status = v.enum("status", request.status, convert.SLOT_STATUSES)
        v.check()
        filters = ["slots", specialist_id, start, end, status]
        page = await store.list_(
            self.db,
            specialist_id=specialist_id,
            window_start=start,
            window_end=end,
            status=status,
            after=pagination.time_and_id(request.page_token, filters),
            limit=size,
        )
        return pb.ListSlotsResponse(
            slots=[convert.slot_fields(s) for s in page.items],
            next_page_token=pagination.next_token(
                page, lambda item: [item.start_time.isoformat(), item.id], filters
            ),
        )

    async def DeleteSlot(
        self, request: pb.DeleteSlotRequest, context: Context
    ) -> pb.DeleteSlotResponse:
        v = Validator()
        slot_id = v.uuid("id", request.id)
        v.check()
        await store.delete(self.db, slot_id)
        return pb.DeleteSlotResponse()

    async def UpdateSlotCapacity(
        self, request: pb.UpdateSlotCapacityRequest, context: Context
    ) -> pb.UpdateSlotCapacityResponse:
        v = Validator()
        slot_id = v.uuid("id", request.id)
        capacity = _capacity(v, "capacity", request.capacity, required=True)
        v.check()
        assert slot_id is not None and capacity is not None
        slot = await store.set_capacity(self.db, slot_id, capacity)
        # Seats added may have gone to waiters: their HELD events are out.
        if self._on_commit is not None:
            self._on_commit()
        return pb.UpdateSlotCapacityResponse(slot=convert.slot(slot))

    async def SearchAvailableSlots(
        self, request: pb.SearchAvailableSlotsRequest, context: Context
    ) -> pb.SearchAvailableSlotsResponse:
        caller = auth.current().require_user()
        v = Validator()
        service_type = v.text(
            "service_type", request.service_type, required=False, max_length=MAX_SERVICE_TYPE
        )
        specialist_ids: list[UUID] | None = None
        if request.specialist_ids:
            if len(request.specialist_ids) > MAX_SEARCH_SPECIALISTS:
                v.fail("specialist_ids", f"at most {MAX_SEARCH_SPECIALISTS} specialists")
            else:
                parsed = [
                    v.uuid(f"specialist_ids[{i}]", value)
                    for i, value in enumerate(request.specialist_ids)
                ]
                specialist_ids = sorted({p for p in parsed if p is not None})
        if (service_type is None) == (not request.specialist_ids):
            v.fail("service_type", "exactly one of service_type and specialist_ids is required")
        start = v.timestamp("window_start_time", request, "window_start_time", required=True)
        end = v.timestamp("window_end_time", request, "window_end_time", required=True)
        v.window(start, end, "window_start_time", "window_end_time")
        if start is not None and end is not None and end - start > MAX_SEARCH_WINDOW:
            v.fail("window_end_time", "at most 92 days after window_start_time")
        size = v.page_size(request.page_size)
        party_size = request.party_size or 1
        if not 1 <= party_size <= MAX_PARTY_SIZE:
            v.fail("party_size", f"must be 1 to {MAX_PARTY_SIZE}, or 0 for 1")
        v.check()
        assert start is not None and end is not None
        filters: list[object] = ["search", service_type, specialist_ids, start, end]
        if party_size != 1:
            # A party of one keeps the tokens it had before party sizes.
            filters.append(party_size)
        page = await store.search_available(
            self.db,
            service_type=service_type,
            specialist_ids=specialist_ids,
            window_start=start,
            window_end=end,
            # Policies (what a CLIENT may book when) apply to CLIENTs only.
            client_id=caller.id if caller.role is Role.CLIENT else None,
            after=pagination.time_and_id(request.page_token, filters),
            limit=size,
            party_size=party_size,
        )
        return pb.SearchAvailableSlotsResponse(
            available_slots=[convert.available_slot(a) for a in page.items],
            next_page_token=pagination.next_token(
                page, lambda item: [item.slot.start_time.isoformat(), item.slot.id], filters
            ),
        )
