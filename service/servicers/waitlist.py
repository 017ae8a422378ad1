"""WaitlistService: joining, reading and leaving the waitlist. Offers are
made by the database when slots free up (docs/waitlist.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from booking.v1 import waitlist_pb2 as pb
from booking.v1 import waitlist_pb2_grpc
from service import auth, convert, pagination
from service.config import Config
from service.grpc_types import Context
from service.policy import act_for, check_priority, owner_scope, scope_to_caller
from service.servicers.appointments import MAX_PARTY_SIZE
from service.validation import Validator
from storage import waitlist as store
from storage.database import Database
from storage.models import Priority

MAX_SERVICE_TYPE = 200
# A wait longer than a year is a standing order, not a waitlist entry.
MAX_WINDOW = timedelta(days=366)


def _owner(caller: auth.Caller) -> UUID | None:
    return owner_scope(caller.require_user())


class WaitlistService(waitlist_pb2_grpc.WaitlistServiceServicer):
    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config

    async def CreateWaitlistEntry(
        self, request: pb.CreateWaitlistEntryRequest, context: Context
    ) -> pb.CreateWaitlistEntryResponse:
        caller = auth.current().require_user()
        v = Validator()
        user_id = v.uuid("user_id", request.user_id, required=False)
        target = request.WhichOneof("target")
        specialist_id: UUID | None = None
        service_type: str | None = None
        if target == "specialist_id":
            specialist_id = v.uuid("specialist_id", request.specialist_id)
        elif target == "service_type":
            service_type = v.text("service_type", request.service_type, max_length=MAX_SERVICE_TYPE)
        else:
            v.fail("specialist_id", "required: a specialist_id or a service_type")
        start = v.timestamp("window_start_time", request, "window_start_time", required=True)
        end = v.timestamp("window_end_time", request, "window_end_time", required=True)
        v.window(start, end, "window_start_time", "window_end_time")
        if start is not None and end is not None and start < end:
            if end <= datetime.now(UTC):
                v.fail("window_end_time", "must be in the future")
            elif end - start > MAX_WINDOW:
                v.fail("window_end_time", "at most 366 days after window_start_time")
        priority = v.enum("priority", request.priority, convert.PRIORITIES) or Priority.NORMAL
        request_id = v.uuid("request_id", request.request_id, required=False)
        party_size = request.party_size or 1
        if not 1 <= party_size <= MAX_PARTY_SIZE:
            v.fail("party_size", f"must be 1 to {MAX_PARTY_SIZE}, or 0 for 1")
        v.check()
        user_id = act_for(caller, user_id, what="join the waitlist for itself")
        check_priority(caller, priority)
        assert start is not None and end is not None
        entry = await store.create(
            self.db,
            user_id=user_id,
            specialist_id=specialist_id,
            service_type=service_type,
            window_start=start,
            window_end=end,
            priority=priority,
            offer_ttl=self.config.waitlist_offer_ttl,
            actor_id=caller.id,
            request_id=request_id,
            party_size=party_size,
        )
        return pb.CreateWaitlistEntryResponse(waitlist_entry=convert.waitlist_entry(entry))

    async def GetWaitlistEntry(
        self, request: pb.GetWaitlistEntryRequest, context: Context
    ) -> pb.GetWaitlistEntryResponse:
        caller = auth.current()
        v = Validator()
        entry_id = v.uuid("id", request.id)
        v.check()
        entry = await store.get(self.db, entry_id, owner_id=_owner(caller))
        return pb.GetWaitlistEntryResponse(waitlist_entry=convert.waitlist_entry(entry))

    async def ListWaitlistEntries(
        self, request: pb.ListWaitlistEntriesRequest, context: Context
    ) -> pb.ListWaitlistEntriesResponse:
        caller = auth.current().require_user()
        v = Validator()
        user_id = v.uuid("user_id", request.user_id, required=False)
        user_id = scope_to_caller(caller, user_id, what="see its own waitlist entries")
        size = v.page_size(request.page_size)
        specialist_id = v.uuid("specialist_id", request.specialist_id, required=False)
        service_type = v.text(
            "service_type", request.service_type, required=False, max_length=MAX_SERVICE_TYPE
        )
        status = v.enum("status", request.status, convert.WAITLIST_STATUSES)
        v.check()
        filters = ["waitlist", user_id, specialist_id, service_type, status]
        page = await store.list_(
            self.db,
            user_id=user_id,
            specialist_id=specialist_id,
            service_type=service_type,
            status=status,
            after=pagination.time_and_id(request.page_token, filters),
            limit=size,
        )
        return pb.ListWaitlistEntriesResponse(
            waitlist_entries=[convert.waitlist_entry(e) for e in page.items],
            next_page_token=pagination.next_token(
                page, lambda item: [item.created_at.isoformat(), item.id], filters
            ),
        )

    async def CancelWaitlistEntry(
        self, request: pb.CancelWaitlistEntryRequest, context: Context
    ) -> pb.CancelWaitlistEntryResponse:
        caller = auth.current()
        v = Validator()
        entry_id = v.uuid("id", request.id)
        v.check()
        entry = await store.cancel(self.db, entry_id, owner_id=_owner(caller))
        return pb.CancelWaitlistEntryResponse(waitlist_entry=convert.waitlist_entry(entry))
