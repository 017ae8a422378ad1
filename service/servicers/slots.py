"""SlotService."""

from __future__ import annotations

from booking.v1 import slot_pb2 as pb
from booking.v1 import slot_pb2_grpc
from service import convert, pagination
from service.grpc_types import Context
from service.validation import Validator
from storage import slots as store
from storage.database import Database
from storage.slots import NewSlot

MAX_BATCH = 1000


def _new_slot(v: Validator, prefix: str, request: pb.CreateSlotRequest) -> NewSlot | None:
    specialist_id = v.uuid(f"{prefix}specialist_id", request.specialist_id)
    start = v.timestamp(f"{prefix}start_time", request, "start_time", required=True)
    end = v.timestamp(f"{prefix}end_time", request, "end_time", required=True)
    if start is not None and end is not None and start >= end:
        v.fail(f"{prefix}end_time", "must be after start_time")
        return None
    if specialist_id is None or start is None or end is None:
        return None
    return NewSlot(specialist_id, start, end)


class SlotService(slot_pb2_grpc.SlotServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def CreateSlot(
        self, request: pb.CreateSlotRequest, context: Context
    ) -> pb.CreateSlotResponse:
        v = Validator()
        new = _new_slot(v, "", request)
        v.check()
        assert new is not None
        (created,) = await store.create_many(self.db, [new])
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
        return pb.BatchCreateSlotsResponse(slots=[convert.slot_fields(s) for s in created])

    async def GetSlot(self, request: pb.GetSlotRequest, context: Context) -> pb.GetSlotResponse:
        v = Validator()
        slot_id = v.uuid("id", request.id)
        v.check()
        assert slot_id is not None
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
        assert slot_id is not None
        await store.delete(self.db, slot_id)
        return pb.DeleteSlotResponse()
