"""AppointmentService: transitions, reads and the event stream."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import UUID

from booking.v1 import appointment_pb2 as pb
from booking.v1 import appointment_pb2_grpc
from service import auth, convert, pagination, telemetry
from service.config import Config
from service.errors import FieldViolation, InvalidArgument
from service.event_hub import EventHub, Heartbeat
from service.grpc_types import Context
from service.policy import act_for, check_priority, owner_scope, policy_exempt, scope_to_caller
from service.validation import Validator
from storage import appointments as store
from storage import events as event_store
from storage import recurrence
from storage import series as series_store
from storage.database import Database
from storage.errors import SeriesTooLarge
from storage.flights import SlotFlights
from storage.models import AppointmentEvent, EventFilter, Position, Priority

MAX_REASON = 1000
# Seats one hold may take (docs/seats.md).
MAX_PARTY_SIZE = 1000
MAX_RECURRENCE = 200
SERIES_MODES = (pb.SERIES_MODE_ALL_OR_NOTHING, pb.SERIES_MODE_AS_MANY_AS_POSSIBLE)
WIRE_CACHE_SIZE = 8192


def _owner(caller: auth.Caller) -> UUID | None:
    return owner_scope(caller.require_user())


def _request_id(v: Validator, value: str) -> UUID | None:
    return v.uuid("request_id", value, required=False)


def _hold_fields(
    v: Validator, request: pb.HoldSlotRequest | pb.HoldSeriesRequest
) -> tuple[UUID | None, Priority, UUID | None, int]:
    """What HoldSlot and HoldSeries share: the user asked for (None: the
    caller), the priority, the request id and the party size."""
    requested = v.uuid("user_id", request.user_id, required=False)
    priority = v.enum("priority", request.priority, convert.PRIORITIES) or Priority.NORMAL
    party_size = request.party_size or 1
    if not 1 <= party_size <= MAX_PARTY_SIZE:
        v.fail("party_size", f"must be 1 to {MAX_PARTY_SIZE}, or 0 for 1")
    return requested, priority, _request_id(v, request.request_id), party_size


class AppointmentService(appointment_pb2_grpc.AppointmentServiceServicer):
    def __init__(
        self,
        db: Database,
        config: Config,
        hub: EventHub,
        authenticator: auth.Authenticator,
        hold_flights: SlotFlights,
    ) -> None:
        self.db = db
        self.hold_flights = hold_flights
        self.config = config
        self.hub = hub
        self.authenticator = authenticator
        self._wire_cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def _wire_event(self, event: AppointmentEvent) -> bytes:
        """The stream message for an event, converted and serialized once
        however many streams send it (conversion dominated the cost of 100
        streams, then serialization): the interceptor sends bytes as they
        are. Keyed by the position's tuple, whose hash is C's, not the
        dataclass's Python one."""
        key = (event.position.xid, event.position.seq)
        wire = self._wire_cache.get(key)
        if wire is None:
            wire = pb.WatchAppointmentEventsResponse(
                event=convert.event_fields(event)
            ).SerializeToString()
            self._wire_cache[key] = wire
            if len(self._wire_cache) > WIRE_CACHE_SIZE:
                self._wire_cache.popitem(last=False)
        return wire

    def _committed(self, event: AppointmentEvent) -> convert.Fields:
        """The appointment a transition answers with; wakes the watchers.

        A replayed request (same request_id) wakes them needlessly, which
        costs one empty read."""
        self.hub.committed()
        return convert.appointment_fields(event.appointment)

    async def HoldSlot(self, request: pb.HoldSlotRequest, context: Context) -> pb.HoldSlotResponse:
        caller = auth.current().require_user()
        v = Validator()
        slot_id = v.uuid("slot_id", request.slot_id)
        requested, priority, request_id, party_size = _hold_fields(v, request)
        v.check()
        user_id = act_for(caller, requested, what="hold slots for itself")
        check_priority(caller, priority)
        event = await store.hold(
            self.db,
            self.hold_flights,
            slot_id=slot_id,
            user_id=user_id,
            priority=priority,
            actor_id=caller.id,
            hold_ttl=self.config.hold_ttl,
            check_user_overlap=self.config.check_user_overlap,
            request_id=request_id,
            policy_exempt=policy_exempt(caller.role),
            party_size=party_size,
        )
        return pb.HoldSlotResponse(appointment=self._committed(event))

    async def ConfirmAppointment(
        self, request: pb.ConfirmAppointmentRequest, context: Context
    ) -> pb.ConfirmAppointmentResponse:
        caller = auth.current()
        v = Validator()
        appointment_id = v.uuid("id", request.id)
        request_id = _request_id(v, request.request_id)
        v.check()
        event = await store.confirm(
            self.db,
            appointment_id,
            owner_id=_owner(caller),
            actor_id=caller.require_user().id,
            request_id=request_id,
        )
        return pb.ConfirmAppointmentResponse(appointment=self._committed(event))

    async def CancelAppointment(
        self, request: pb.CancelAppointmentRequest, context: Context
    ) -> pb.CancelAppointmentResponse:
        caller = auth.current()
        v = Validator()
        appointment_id = v.uuid("id", request.id)
        reason = v.text("reason", request.reason, required=False, max_length=MAX_REASON)
        request_id = _request_id(v, request.request_id)
        v.check()
        user = caller.require_user()
        event = await store.cancel(
            self.db,
            appointment_id,
            owner_id=_owner(caller),
            actor_id=user.id,
            reason=reason,
            request_id=request_id,
            policy_exempt=policy_exempt(user.role),
        )
        return pb.CancelAppointmentResponse(appointment=self._committed(event))

    async def HoldSeries(
        self, request: pb.HoldSeriesRequest, context: Context
    ) -> pb.HoldSeriesResponse:
        caller = auth.current().require_user()
        v = Validator()
        slot_id = v.uuid("first_slot_id", request.first_slot_id)
        requested, priority, request_id, party_size = _hold_fields(v, request)
        rule = None
        text = v.text("recurrence", request.recurrence, max_length=MAX_RECURRENCE)
        if text is not None:
            try:
                rule = recurrence.parse(text)
            except recurrence.RecurrenceError as exc:
                v.fail("recurrence", str(exc))
            else:
                if rule.count is not None and rule.count > self.config.series_max_occurrences:
                    raise SeriesTooLarge(
                        occurrences=str(rule.count),
                        max_occurrences=str(self.config.series_max_occurrences),
                    )
        if request.mode not in SERIES_MODES:
            v.fail("mode", "required: ALL_OR_NOTHING or AS_MANY_AS_POSSIBLE")
        v.check()
        user_id = act_for(caller, requested, what="hold slots for itself")
        check_priority(caller, priority)
        assert rule is not None and text is not None
        series = await series_store.hold(
            self.db,
            first_slot_id=slot_id,
            rule=rule,
            recurrence_text=text,
            all_or_nothing=request.mode == pb.SERIES_MODE_ALL_OR_NOTHING,
            user_id=user_id,
            priority=priority,
            actor_id=caller.id,
            hold_ttl=self.config.hold_ttl,
            check_user_overlap=self.config.check_user_overlap,
            request_id=request_id,
            policy_exempt=policy_exempt(caller.role),
            party_size=party_size,
            max_occurrences=self.config.series_max_occurrences,
            max_days=self.config.series_max_days,
        )
        self.hub.committed()
        return pb.HoldSeriesResponse(
            series_id=str(series.id),
            held=series.held,
            occurrences=[convert.series_occurrence(o) for o in series.occurrences],
        )

    async def ConfirmSeries(
        self, request: pb.ConfirmSeriesRequest, context: Context
    ) -> pb.ConfirmSeriesResponse:
        caller = auth.current()
        v = Validator()
        series_id = v.uuid("series_id", request.series_id)
        request_id = _request_id(v, request.request_id)
        v.check()
        assert series_id is not None
        appointments = await series_store.confirm(
            self.db,
            series_id,
            owner_id=_owner(caller),
            actor_id=caller.require_user().id,
            request_id=request_id,
        )
        self.hub.committed()
        return pb.ConfirmSeriesResponse(appointments=[convert.appointment(a) for a in appointments])

    async def CancelSeries(
        self, request: pb.CancelSeriesRequest, context: Context
    ) -> pb.CancelSeriesResponse:
        caller = auth.current()
        v = Validator()
        series_id = v.uuid("series_id", request.series_id)
        reason = v.text("reason", request.reason, required=False, max_length=MAX_REASON)
        request_id = _request_id(v, request.request_id)
        v.check()
        assert series_id is not None
        user = caller.require_user()
        appointments = await series_store.cancel(
            self.db,
            series_id,
            owner_id=_owner(caller),
            actor_id=user.id,
            reason=reason,
            policy_exempt=policy_exempt(user.role),
            request_id=request_id,
        )
        self.hub.committed()
        return pb.CancelSeriesResponse(appointments=[convert.appointment(a) for a in appointments])

    async def MarkNoShow(
        self, request: pb.MarkNoShowRequest, context: Context
    ) -> pb.MarkNoShowResponse:
        caller = auth.current().require_user()
        v = Validator()
        appointment_id = v.uuid("id", request.id)
        request_id = _request_id(v, request.request_id)
        v.check()
        event = await store.mark_no_show(
            self.db, appointment_id, actor_id=caller.id, request_id=request_id
        )
        return pb.MarkNoShowResponse(appointment=self._committed(event))

    async def RescheduleAppointment(
        self, request: pb.RescheduleAppointmentRequest, context: Context
    ) -> pb.RescheduleAppointmentResponse:
        caller = auth.current()
        v = Validator()
        appointment_id = v.uuid("id", request.id)
        new_slot_id = v.uuid("new_slot_id", request.new_slot_id)
        request_id = _request_id(v, request.request_id)
        v.check()
        user = caller.require_user()
        event = await store.reschedule(
            self.db,
            appointment_id,
            new_slot_id=new_slot_id,
            owner_id=_owner(caller),
            actor_id=user.id,
            check_user_overlap=self.config.check_user_overlap,
            request_id=request_id,
            policy_exempt=policy_exempt(user.role),
        )
        return pb.RescheduleAppointmentResponse(appointment=self._committed(event))

    async def GetAppointment(
        self, request: pb.GetAppointmentRequest, context: Context
    ) -> pb.GetAppointmentResponse:
        caller = auth.current()
        v = Validator()
        appointment_id = v.uuid("id", request.id)
        v.check()
        found = await store.get(self.db, appointment_id, owner_id=_owner(caller))
        return pb.GetAppointmentResponse(appointment=convert.appointment(found))

    def _scoped_user(self, v: Validator, value: str, field: str = "user_id") -> UUID | None:
        """The user filter, forced to the caller for a CLIENT."""
        caller = auth.current().require_user()
        user_id = v.uuid(field, value, required=False)
        return scope_to_caller(caller, user_id, what="see its own appointments")

    async def ListAppointments(
        self, request: pb.ListAppointmentsRequest, context: Context
    ) -> pb.ListAppointmentsResponse:
        v = Validator()
        user_id = self._scoped_user(v, request.user_id)
        size = v.page_size(request.page_size)
        specialist_id = v.uuid("specialist_id", request.specialist_id, required=False)
        status = v.enum("status", request.status, convert.APPOINTMENT_STATUSES)
        start = v.timestamp("window_start_time", request, "window_start_time", required=False)
        end = v.timestamp("window_end_time", request, "window_end_time", required=False)
        v.window(start, end, "window_start_time", "window_end_time")
        v.check()
        filters = ["appointments", user_id, specialist_id, status, start, end]
        page = await store.list_(
            self.db,
            user_id=user_id,
            specialist_id=specialist_id,
            status=status,
            window_start=start,
            window_end=end,
            after=pagination.time_and_id(request.page_token, filters),
            limit=size,
        )
        return pb.ListAppointmentsResponse(
            appointments=[convert.appointment_fields(a) for a in page.items],
            next_page_token=pagination.next_token(
                page, lambda item: [item.start_time.isoformat(), item.id], filters
            ),
        )

    def _event_filter(self, v: Validator, f: pb.AppointmentEventFilter) -> EventFilter:
        user_id = self._scoped_user(v, f.user_id, "filter.user_id")
        types = [
            v.enum(f"filter.types[{i}]", t, convert.EVENT_TYPES, required=True)
            for i, t in enumerate(f.types)
        ]
        return EventFilter(
            specialist_id=v.uuid("filter.specialist_id", f.specialist_id, required=False),
            user_id=user_id,
            appointment_id=v.uuid("filter.appointment_id", f.appointment_id, required=False),
            types=frozenset(t for t in types if t is not None),
        )

    @staticmethod
    def _cursor(v: Validator, field: str, value: str) -> Position | None:
        if not value:
            return None
        position = convert.parse_cursor(value)
        if position is None:
            v.fail(field, "not a cursor returned by this service")
        return position

    async def ListAppointmentEvents(
        self, request: pb.ListAppointmentEventsRequest, context: Context
    ) -> pb.ListAppointmentEventsResponse:
        v = Validator()
        filter_ = self._event_filter(v, request.filter)
        size = v.page_size(request.page_size)
        after = self._cursor(v, "after_cursor", request.after_cursor) or Position.start()
        v.check()
        filters = [
            "events",
            filter_.specialist_id,
            filter_.user_id,
            filter_.appointment_id,
            sorted(filter_.types),
            request.after_cursor,
        ]
        key = pagination.decode(request.page_token, filters)
        if key is not None:
            resumed = convert.parse_cursor(key[0]) if len(key) == 1 else None
            if resumed is None:
                raise InvalidArgument(
                    violations=[
                        FieldViolation("page_token", "not a page token issued by this service")
                    ]
                )
            after = resumed
        # Read where the event hub reads (a hot standby, or the primary).
        batch, reached, _ = await event_store.read_after(
            self.hub.db, after, filter_, size, gate=self.hub.gate
        )
        return pb.ListAppointmentEventsResponse(
            events=[convert.event_fields(e) for e in batch],
            next_page_token=pagination.encode([convert.cursor(reached)], filters)
            if len(batch) == size
            else "",
        )

    async def WatchAppointmentEvents(  # type: ignore[override]  # bytes: serialized once
        self, request: pb.WatchAppointmentEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchAppointmentEventsResponse | bytes]:
        v = Validator()
        filter_ = self._event_filter(v, request.filter)
        start = request.WhichOneof("start")
        after: Position | None = None
        if start == "after_cursor":
            after = self._cursor(v, "after_cursor", request.after_cursor)
            if after is None and not v.violations:
                v.fail("after_cursor", "must not be empty when set")
        elif start == "start_position" and request.start_position not in (
            pb.WATCH_START_POSITION_UNSPECIFIED,
            pb.WATCH_START_POSITION_BEGINNING,
            pb.WATCH_START_POSITION_NOW,
        ):
            v.fail("start_position", f"unknown value {request.start_position}")
        v.check()
        if after is None:
            if (
                start == "start_position"
                and request.start_position == pb.WATCH_START_POSITION_BEGINNING
            ):
                after = Position.start()
            else:
                after = await self.hub.stable_head()
        # Checked here, not only on table reads: recent events are served
        # from memory, which may still hold some the database has pruned.
        after = await self.hub.resume_point(after)
        # The stream outlives the call's authorization: the guard ends it
        # (UNAUTHENTICATED) when its token is revoked, its user deactivated,
        # or the token expires.
        with (
            self.hub.stream_slot(),
            self.authenticator.guard(auth.current(), wake=self.hub.wake) as guard,
        ):
            lag = telemetry.metrics()
            async for item in self.hub.watch(after, filter_, self.config.heartbeat_seconds, guard):
                if isinstance(item, Heartbeat):
                    yield pb.WatchAppointmentEventsResponse(
                        heartbeat=pb.Heartbeat(
                            cursor=convert.cursor(item.position), time=convert.timestamp(item.time)
                        )
                    )
                else:
                    if lag.enabled:
                        lag.event_lag.record(
                            max((datetime.now(UTC) - item.created_at).total_seconds(), 0.0)
                        )
                    yield self._wire_event(item)
