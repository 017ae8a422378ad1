"""ScheduleService: working hours, and their materialisation into slots."""

from __future__ import annotations

from collections.abc import Callable

from booking.v1 import schedule_pb2 as pb
from booking.v1 import schedule_pb2_grpc
from service import auth, convert
from service.config import Config
from service.grpc_types import Context
from service.validation import Validator
from storage import schedules as store
from storage.database import Database
from storage.models import SlotStatus
from storage.schedules import MaterializeReport, SpecialistSchedule
from storage.wallclock import (
    MINUTES_PER_DAY,
    ExceptionKind,
    Schedule,
    ScheduleException,
    SkipReason,
    WeeklyRule,
    format_minute,
)

MAX_RULES = 100
MAX_EXCEPTIONS = 1000

KINDS: dict[int, ExceptionKind] = {
    pb.SCHEDULE_EXCEPTION_KIND_OFF: ExceptionKind.OFF,
    pb.SCHEDULE_EXCEPTION_KIND_EXTRA: ExceptionKind.EXTRA,
}
_KIND_WIRE: dict[ExceptionKind, pb.ScheduleExceptionKind.ValueType] = {
    ExceptionKind.OFF: pb.SCHEDULE_EXCEPTION_KIND_OFF,
    ExceptionKind.EXTRA: pb.SCHEDULE_EXCEPTION_KIND_EXTRA,
}
WEEKDAYS = {day: day for day in range(1, 8)}  # the wire enum is ISO numbered
SKIP_REASONS = {
    SkipReason.EXISTING_SLOT: pb.SKIP_REASON_EXISTING_SLOT,
    SkipReason.OVERLAPS_EXISTING_SLOT: pb.SKIP_REASON_OVERLAPS_EXISTING_SLOT,
    SkipReason.OVERLAPS_SCHEDULED_SLOT: pb.SKIP_REASON_OVERLAPS_SCHEDULED_SLOT,
    SkipReason.NONEXISTENT_LOCAL_TIME: pb.SKIP_REASON_NONEXISTENT_LOCAL_TIME,
    SkipReason.CROSSES_CLOCK_CHANGE: pb.SKIP_REASON_CROSSES_CLOCK_CHANGE,
    SkipReason.STARTS_IN_THE_PAST: pb.SKIP_REASON_STARTS_IN_THE_PAST,
}


def _hours(
    v: Validator, prefix: str, start: str, end: str, *, required: bool
) -> tuple[int | None, int | None]:
    start_minute = v.local_time(f"{prefix}start_time", start, required=required)
    end_minute = v.local_time(f"{prefix}end_time", end, required=required)
    if start_minute == MINUTES_PER_DAY:
        v.fail(f"{prefix}start_time", "a day's hours start before 24:00")
    if start_minute is not None and end_minute is not None and start_minute >= end_minute:
        v.fail(f"{prefix}end_time", "must be after start_time")
    if not required and bool(start) != bool(end):
        v.fail(f"{prefix}end_time", "start_time and end_time go together")
    return start_minute, end_minute


def _length(v: Validator, field: str, value: int) -> int | None:
    return v.bounded(field, value, 1, MINUTES_PER_DAY)


def _gap(v: Validator, field: str, value: int) -> int | None:
    return v.bounded(field, value, 0, MINUTES_PER_DAY)


def _rule(v: Validator, prefix: str, rule: pb.WeeklyRule) -> WeeklyRule | None:
    errors = len(v.violations)
    weekday = v.enum(f"{prefix}weekday", rule.weekday, WEEKDAYS, required=True)
    start, end = _hours(v, prefix, rule.start_time, rule.end_time, required=True)
    length = _length(v, f"{prefix}slot_minutes", rule.slot_minutes)
    gap = _gap(v, f"{prefix}gap_minutes", rule.gap_minutes)
    since = v.date(f"{prefix}effective_from", rule.effective_from, required=False)
    until = v.date(f"{prefix}effective_until", rule.effective_until, required=False)
    if since is not None and until is not None and since > until:
        v.fail(f"{prefix}effective_until", "must not be before effective_from")
    if len(v.violations) > errors:
        return None
    assert weekday is not None and start is not None and end is not None
    assert length is not None and gap is not None
    return WeeklyRule(weekday, start, end, length, gap, since, until)


def _exception(v: Validator, prefix: str, x: pb.ScheduleException) -> ScheduleException | None:
    errors = len(v.violations)
    on_date = v.date(f"{prefix}date", x.date)
    kind = v.enum(f"{prefix}kind", x.kind, KINDS, required=True)
    extra = kind is ExceptionKind.EXTRA
    start, end = _hours(v, prefix, x.start_time, x.end_time, required=extra)
    length = gap = None
    if extra:
        length = _length(v, f"{prefix}slot_minutes", x.slot_minutes)
        gap = _gap(v, f"{prefix}gap_minutes", x.gap_minutes)
    elif x.slot_minutes or x.gap_minutes:
        v.fail(f"{prefix}slot_minutes", "only extra hours have slots")
    if len(v.violations) > errors:
        return None
    assert on_date is not None and kind is not None
    return ScheduleException(on_date, kind, start, end, length, gap)


def _schedule(v: Validator, message: pb.Schedule) -> Schedule:
    if len(message.rules) > MAX_RULES:
        v.fail("schedule.rules", f"at most {MAX_RULES} rules")
        return Schedule()
    if len(message.exceptions) > MAX_EXCEPTIONS:
        v.fail("schedule.exceptions", f"at most {MAX_EXCEPTIONS} exceptions")
        return Schedule()
    rules = [_rule(v, f"schedule.rules[{i}].", r) for i, r in enumerate(message.rules)]
    exceptions = [
        _exception(v, f"schedule.exceptions[{i}].", x) for i, x in enumerate(message.exceptions)
    ]
    return Schedule(
        rules=tuple(r for r in rules if r is not None),
        exceptions=tuple(x for x in exceptions if x is not None),
    )


def _wire_schedule(found: SpecialistSchedule) -> pb.Schedule:
    return pb.Schedule(
        specialist_id=str(found.specialist_id),
        time_zone=found.time_zone,
        rules=[
            pb.WeeklyRule(
                weekday=r.weekday,  # type: ignore[arg-type]
                start_time=format_minute(r.start_minute),
                end_time=format_minute(r.end_minute),
                slot_minutes=r.slot_minutes,
                gap_minutes=r.gap_minutes,
                effective_from=r.effective_from.isoformat() if r.effective_from else "",
                effective_until=r.effective_until.isoformat() if r.effective_until else "",
            )
            for r in found.schedule.rules
        ],
        exceptions=[
            pb.ScheduleException(
                date=x.on_date.isoformat(),
                kind=_KIND_WIRE[x.kind],
                start_time=format_minute(x.start_minute) if x.start_minute is not None else "",
                end_time=format_minute(x.end_minute) if x.end_minute is not None else "",
                slot_minutes=x.slot_minutes or 0,
                gap_minutes=x.gap_minutes or 0,
            )
            for x in found.schedule.exceptions
        ],
    )


def _wire_report(report: MaterializeReport) -> pb.MaterializeScheduleResponse:
    created = []
    for s in report.created:
        slot = convert.slot(s)
        if report.preview:
            slot.ClearField("id")
            slot.ClearField("create_time")
        created.append(slot)
    skipped = []
    for k in report.skipped:
        item = pb.SkippedSlot(
            date=k.on_date.isoformat(),
            start_time=k.local_start,
            end_time=k.local_end,
            reason=SKIP_REASONS[k.reason],
            conflicting_slot_id=str(k.conflicting_slot_id) if k.conflicting_slot_id else "",
        )
        if k.start_time is not None and k.end_time is not None:
            item.start_instant.CopyFrom(convert.timestamp(k.start_time))
            item.end_instant.CopyFrom(convert.timestamp(k.end_time))
        skipped.append(item)
    return pb.MaterializeScheduleResponse(
        created_slots=created,
        skipped_slots=skipped,
        time_zone=report.time_zone,
        tz_version=report.tz_version,
    )


class ScheduleService(schedule_pb2_grpc.ScheduleServiceServicer):
    def __init__(
        self, db: Database, config: Config, on_commit: Callable[[], None] | None = None
    ) -> None:
        self.db = db
        self.config = config
        # Wakes the event watchers: a materialised slot may have gone to a waiter.
        self._on_commit = on_commit

    async def GetSchedule(
        self, request: pb.GetScheduleRequest, context: Context
    ) -> pb.GetScheduleResponse:
        v = Validator()
        specialist_id = v.uuid("specialist_id", request.specialist_id)
        v.check()
        return pb.GetScheduleResponse(
            schedule=_wire_schedule(await store.get(self.db, specialist_id))
        )

    async def UpdateSchedule(
        self, request: pb.UpdateScheduleRequest, context: Context
    ) -> pb.UpdateScheduleResponse:
        v = Validator()
        specialist_id = v.uuid("specialist_id", request.specialist_id)
        if not request.HasField("schedule"):
            v.fail("schedule", "required (an empty schedule clears it)")
        schedule = _schedule(v, request.schedule)
        v.check()
        return pb.UpdateScheduleResponse(
            schedule=_wire_schedule(await store.replace(self.db, specialist_id, schedule))
        )

    async def MaterializeSchedule(
        self, request: pb.MaterializeScheduleRequest, context: Context
    ) -> pb.MaterializeScheduleResponse:
        caller = auth.current().require_user()
        v = Validator()
        specialist_id = v.uuid("specialist_id", request.specialist_id)
        first = v.date("start_date", request.start_date)
        end = v.date("end_date", request.end_date)
        request_id = v.uuid("request_id", request.request_id, required=False)
        if first is not None and end is not None:
            if end <= first:
                v.fail("end_date", "must be after start_date (it is exclusive)")
            elif (end - first).days > self.config.schedule_max_days:
                v.fail(
                    "end_date",
                    f"at most {self.config.schedule_max_days} days after start_date per call",
                )
        v.check()
        assert first is not None and end is not None
        report = await store.materialize(
            self.db,
            specialist_id,
            first=first,
            end=end,
            actor_id=caller.id,
            request_id=request_id,
            preview=request.validate_only,
            max_slots=self.config.schedule_max_slots,
        )
        if self._on_commit is not None and any(s.status is SlotStatus.HOLD for s in report.created):
            self._on_commit()
        return _wire_report(report)
