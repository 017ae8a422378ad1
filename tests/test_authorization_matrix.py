"""Authorization: every RPC of every booking.v1 service, called by every kind
of caller, against an explicit table of expected status codes; plus the
object-level rules (a CLIENT only ever sees its own appointments) and the
deny-by-default guarantee for RPCs that have no declared policy.

The RPCs are enumerated from the generated descriptors, so a new RPC (or a
new service) shows up here on its own and fails until it has a row in
EXPECTED_ROWS, a request builder in BUILDERS and a policy in
service.policy.POLICIES.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import inspect
import itertools
import pkgutil
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

import booking.v1
from booking.v1 import appointment_pb2 as apb
from booking.v1 import auth_pb2
from booking.v1 import calendar_pb2 as calpb
from booking.v1 import calendar_pb2_grpc as calpb_grpc
from booking.v1 import schedule_pb2 as sched_pb
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from booking.v1 import user_pb2 as upb
from booking.v1 import waitlist_pb2 as wpb
from booking.v1 import webhook_pb2 as whpb
from booking.v1 import webhook_pb2_grpc as whpb_grpc
from service import auth
from service.config import Config
from service.errors import PermissionDenied
from service.policy import POLICIES, POLICY_EXEMPT_ROLES, policy_exempt
from service.server import BookingServer
from storage import auth as auth_store
from storage.database import Database
from storage.models import Role
from tests.support import PASSWORD, Api, RpcFailure, expect_failure, failure, hours_from_now, ts

# ---------------------------------------------------------------------------
# The RPCs, straight from the generated descriptors.
# ---------------------------------------------------------------------------


def _pb2_modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"{booking.v1.__name__}.{info.name}")
        for info in pkgutil.iter_modules(booking.v1.__path__)
        if info.name.endswith("_pb2")
    ]


def _methods() -> dict[str, MethodDescriptor]:
    """Every RPC of every booking.v1 service, keyed by its gRPC path
    ("/booking.v1.Service/Method", the form POLICIES uses)."""
    out: dict[str, MethodDescriptor] = {}
    for module in _pb2_modules():
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out[f"/{service.full_name}/{method.name}"] = method
    return out


METHODS = _methods()
SERVICES = sorted({m.containing_service.full_name for m in METHODS.values()})


class Caller(enum.StrEnum):
    ANONYMOUS = "anonymous"
    CLIENT = "client"  # owns the appointments the requests point at
    OTHER_CLIENT = "other-client"  # another CLIENT, same requests
    OPERATOR = "operator"
    ADMIN = "admin"
    DEACTIVATED = "deactivated"  # a live token of a deactivated CLIENT
    EXPIRED = "expired"  # an expired token of the owning CLIENT
    FORGED = "forged"  # a well-formed token the server never issued


OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND

# ---------------------------------------------------------------------------
# The expected outcome of every cell. Every request targets objects of the
# CLIENT column (its user record, its appointments); see BUILDERS below.
#
# Login/CreateUser are the anonymous paths: a caller whose token is dead
# (deactivated, expired, forged) gets what an anonymous caller gets there.
# The CreateUser cells ask for a CLIENT with self sign-up on, which anyone may
# (docs/auth.md); who may create which role is tested in
# test_who_may_create_which_role below.
# ---------------------------------------------------------------------------

COLUMNS = tuple(Caller)
P = "/booking.v1."

# fmt: off
EXPECTED_ROWS: dict[str, tuple[grpc.StatusCode, ...]] = {
    # RPC                                          anon    client  other      operator admin  deact   expired forged
    P + "AuthService/Login":                       (OK,     OK,     OK,        OK,     OK,     OK,     OK,     OK),
    P + "AuthService/WhoAmI":                      (UNAUTH, OK,     OK,        OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AuthService/Logout":                      (UNAUTH, OK,     OK,        OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "UserService/CreateUser":                  (OK,     OK,     OK,        OK,     OK,     OK,     OK,     OK),
    P + "UserService/GetUser":                     (UNAUTH, OK,     DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "UserService/ListUsers":                   (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "UserService/UpdateUser":                  (UNAUTH, OK,     DENIED,    DENIED, OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SpecialistService/CreateSpecialist":      (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SpecialistService/GetSpecialist":         (UNAUTH, OK,     OK,        OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SpecialistService/ListSpecialists":       (UNAUTH, OK,     OK,        OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SpecialistService/UpdateSpecialist":      (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "ScheduleService/GetSchedule":             (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "ScheduleService/UpdateSchedule":          (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "ScheduleService/MaterializeSchedule":     (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SlotService/CreateSlot":                  (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SlotService/BatchCreateSlots":            (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SlotService/GetSlot":                     (UNAUTH, OK,     OK,        OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SlotService/ListSlots":                   (UNAUTH, OK,     OK,        OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SlotService/DeleteSlot":                  (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SlotService/UpdateSlotCapacity":          (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "SlotService/SearchAvailableSlots":        (UNAUTH, OK,     OK,        OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/HoldSlot":             (UNAUTH, OK,     DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/ConfirmAppointment":   (UNAUTH, OK,     NOT_FOUND, OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/CancelAppointment":    (UNAUTH, OK,     NOT_FOUND, OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/RescheduleAppointment": (UNAUTH, OK,    NOT_FOUND, OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/MarkNoShow":           (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/HoldSeries":           (UNAUTH, OK,     DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/ConfirmSeries":        (UNAUTH, OK,     NOT_FOUND, OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/CancelSeries":         (UNAUTH, OK,     NOT_FOUND, OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/GetAppointment":       (UNAUTH, OK,     NOT_FOUND, OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/ListAppointments":     (UNAUTH, OK,     DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/ListAppointmentEvents": (UNAUTH, OK,    DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "AppointmentService/WatchAppointmentEvents": (UNAUTH, OK,   DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "WaitlistService/CreateWaitlistEntry":     (UNAUTH, OK,     DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "WaitlistService/GetWaitlistEntry":        (UNAUTH, OK,     NOT_FOUND, OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "WaitlistService/ListWaitlistEntries":     (UNAUTH, OK,     DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "WaitlistService/CancelWaitlistEntry":     (UNAUTH, OK,     NOT_FOUND, OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "CalendarFeedService/RotateCalendarFeedToken": (UNAUTH, OK, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "CalendarFeedService/RevokeCalendarFeedToken": (UNAUTH, OK, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "WebhookService/CreateWebhookEndpoint":    (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "WebhookService/GetWebhookEndpoint":       (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "WebhookService/ListWebhookEndpoints":     (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "WebhookService/RotateWebhookSecret":      (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "WebhookService/EnableWebhookEndpoint":    (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
    P + "WebhookService/DeleteWebhookEndpoint":    (UNAUTH, DENIED, DENIED,    OK,     OK,     UNAUTH, UNAUTH, UNAUTH),
}
# fmt: on

EXPECTED: dict[tuple[str, Caller], grpc.StatusCode] = {
    (rpc, caller): code
    for rpc, row in EXPECTED_ROWS.items()
    for caller, code in zip(COLUMNS, row, strict=True)
}

# ---------------------------------------------------------------------------
# A small world every cell works in, and a valid request for every RPC.
# ---------------------------------------------------------------------------


@dataclass
class World:
    api: Api  # ADMIN
    db: Database
    users: dict[Caller, str]  # user id per caller kind (not ANONYMOUS, FORGED)
    login_email: str
    specialist_id: str
    _hours: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def owner_id(self) -> str:
        return self.users[Caller.CLIENT]

    def start(self, *, past: bool = False) -> datetime:
        """A fresh hour: no two slots (or one user's appointments) overlap."""
        n = next(self._hours)
        return hours_from_now(-n if past else 24 + n)

    async def slot(self, *, past: bool = False) -> str:
        return (await self.api.slot(self.specialist_id, self.start(past=past))).id

    async def owner_hold(self, *, past: bool = False) -> str:
        """A fresh HOLD appointment of the owning CLIENT; returns its id."""
        held = await self.api.hold(await self.slot(past=past), user_id=self.owner_id)
        return held.id

    async def token(self, caller: Caller) -> str | None:
        """A fresh token for one cell (so Logout in one cell harms no other)."""
        if caller is Caller.ANONYMOUS:
            return None
        token = auth.TOKEN_PREFIX + secrets.token_urlsafe(32)
        if caller is Caller.FORGED:
            return token
        await auth_store.create_token(
            self.db,
            user_id=uuid.UUID(self.users[caller]),
            token_hash=auth.digest(token),
            ttl=timedelta(seconds=-1) if caller is Caller.EXPIRED else timedelta(hours=1),
        )
        return token


def _email() -> str:
    return f"matrix-{uuid.uuid4().hex[:12]}@example.com"


def _slot_request(w: World) -> spb.CreateSlotRequest:
    start = w.start()
    return spb.CreateSlotRequest(
        specialist_id=w.specialist_id,
        start_time=ts(start),
        end_time=ts(start + timedelta(minutes=30)),
    )


def _owner_filter(w: World) -> apb.AppointmentEventFilter:
    return apb.AppointmentEventFilter(user_id=w.owner_id)


async def _confirmed_past_appointment(w: World) -> str:
    appointment_id = await w.owner_hold(past=True)
    await w.api.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=appointment_id), metadata=w.api.md
    )
    return appointment_id


Builder = Callable[[World], Awaitable[Message]]


async def _login(w: World) -> Message:
    return auth_pb2.LoginRequest(email=w.login_email, password=PASSWORD)


async def _who_am_i(w: World) -> Message:
    return auth_pb2.WhoAmIRequest()


async def _logout(w: World) -> Message:
    return auth_pb2.LogoutRequest()


async def _create_user(w: World) -> Message:
    return upb.CreateUserRequest(email=_email(), password=PASSWORD)


async def _get_user(w: World) -> Message:
    return upb.GetUserRequest(id=w.owner_id)


async def _list_users(w: World) -> Message:
    return upb.ListUsersRequest()


async def _update_user(w: World) -> Message:
    return upb.UpdateUserRequest(
        user=upb.User(id=w.owner_id, email=_email()), update_mask=FieldMask(paths=["email"])
    )


async def _create_specialist(w: World) -> Message:
    return sppb.CreateSpecialistRequest(full_name="Dr. Matrix", service_type="dentist")


async def _get_specialist(w: World) -> Message:
    return sppb.GetSpecialistRequest(id=w.specialist_id)


async def _list_specialists(w: World) -> Message:
    return sppb.ListSpecialistsRequest()


async def _update_specialist(w: World) -> Message:
    return sppb.UpdateSpecialistRequest(
        specialist=sppb.Specialist(id=w.specialist_id, full_name=f"Dr. {uuid.uuid4().hex[:6]}"),
        update_mask=FieldMask(paths=["full_name"]),
    )


def _one_day_schedule(w: World) -> sched_pb.Schedule:
    # A day of its own each time, so runs never meet earlier slots.
    day = w.start().date()
    return sched_pb.Schedule(
        rules=[
            sched_pb.WeeklyRule(
                weekday=day.isoweekday(),  # type: ignore[arg-type]
                start_time="00:00",
                end_time="00:30",
                slot_minutes=30,
                effective_from=day.isoformat(),
                effective_until=day.isoformat(),
            )
        ]
    )


async def _get_schedule(w: World) -> Message:
    return sched_pb.GetScheduleRequest(specialist_id=w.specialist_id)


async def _update_schedule(w: World) -> Message:
    return sched_pb.UpdateScheduleRequest(
        specialist_id=w.specialist_id, schedule=_one_day_schedule(w)
    )


async def _materialize_schedule(w: World) -> Message:
    day = w.start().date()
    return sched_pb.MaterializeScheduleRequest(
        specialist_id=w.specialist_id,
        start_date=day.isoformat(),
        end_date=(day + timedelta(days=1)).isoformat(),
    )


async def _create_slot(w: World) -> Message:
    return _slot_request(w)


async def _batch_create_slots(w: World) -> Message:
    return spb.BatchCreateSlotsRequest(requests=[_slot_request(w), _slot_request(w)])


async def _get_slot(w: World) -> Message:
    return spb.GetSlotRequest(id=await w.slot())


async def _list_slots(w: World) -> Message:
    return spb.ListSlotsRequest(specialist_id=w.specialist_id)


async def _delete_slot(w: World) -> Message:
    return spb.DeleteSlotRequest(id=await w.slot())


async def _update_slot_capacity(w: World) -> Message:
    return spb.UpdateSlotCapacityRequest(id=await w.slot(), capacity=3)


async def _hold_slot(w: World) -> Message:
    return apb.HoldSlotRequest(slot_id=await w.slot(), user_id=w.owner_id)


def _series_request(slot_id: str, user_id: str) -> apb.HoldSeriesRequest:
    return apb.HoldSeriesRequest(
        first_slot_id=slot_id,
        recurrence="FREQ=WEEKLY;COUNT=1",
        mode=apb.SERIES_MODE_ALL_OR_NOTHING,
        user_id=user_id,
    )


async def _hold_series(w: World) -> Message:
    return _series_request(await w.slot(), w.owner_id)


async def _owner_series(w: World) -> str:
    reply = await w.api.appointments.HoldSeries(
        _series_request(await w.slot(), w.owner_id), metadata=w.api.md
    )
    return reply.series_id


async def _confirm_series(w: World) -> Message:
    return apb.ConfirmSeriesRequest(series_id=await _owner_series(w))


async def _cancel_series(w: World) -> Message:
    return apb.CancelSeriesRequest(series_id=await _owner_series(w))


async def _confirm(w: World) -> Message:
    return apb.ConfirmAppointmentRequest(id=await w.owner_hold())


async def _cancel(w: World) -> Message:
    return apb.CancelAppointmentRequest(id=await w.owner_hold(), reason="changed my mind")


async def _reschedule(w: World) -> Message:
    return apb.RescheduleAppointmentRequest(id=await w.owner_hold(), new_slot_id=await w.slot())


async def _mark_no_show(w: World) -> Message:
    return apb.MarkNoShowRequest(id=await _confirmed_past_appointment(w))


async def _get_appointment(w: World) -> Message:
    return apb.GetAppointmentRequest(id=await w.owner_hold())


async def _list_appointments(w: World) -> Message:
    return apb.ListAppointmentsRequest(user_id=w.owner_id)


async def _list_events(w: World) -> Message:
    return apb.ListAppointmentEventsRequest(filter=_owner_filter(w))


async def _watch_events(w: World) -> Message:
    return apb.WatchAppointmentEventsRequest(
        filter=_owner_filter(w), start_position=apb.WATCH_START_POSITION_BEGINNING
    )


async def _search_slots(w: World) -> Message:
    start = hours_from_now(24)
    return spb.SearchAvailableSlotsRequest(
        service_type="dentist",
        window_start_time=ts(start),
        window_end_time=ts(start + timedelta(days=7)),
    )


def _waitlist_request(w: World) -> wpb.CreateWaitlistEntryRequest:
    start = w.start()
    return wpb.CreateWaitlistEntryRequest(
        user_id=w.owner_id,
        specialist_id=w.specialist_id,
        window_start_time=ts(start),
        window_end_time=ts(start + timedelta(minutes=30)),
    )


async def _owner_waitlist_entry(w: World) -> str:
    """A fresh ACTIVE waitlist entry of the owning CLIENT; returns its id."""
    reply = await w.api.waitlist.CreateWaitlistEntry(_waitlist_request(w), metadata=w.api.md)
    return reply.waitlist_entry.id


async def _create_waitlist_entry(w: World) -> Message:
    return _waitlist_request(w)


async def _get_waitlist_entry(w: World) -> Message:
    return wpb.GetWaitlistEntryRequest(id=await _owner_waitlist_entry(w))


async def _list_waitlist_entries(w: World) -> Message:
    return wpb.ListWaitlistEntriesRequest(user_id=w.owner_id)


async def _cancel_waitlist_entry(w: World) -> Message:
    return wpb.CancelWaitlistEntryRequest(id=await _owner_waitlist_entry(w))


async def _rotate_feed(w: World) -> Message:
    return calpb.RotateCalendarFeedTokenRequest(user_id=w.owner_id)


async def _revoke_feed(w: World) -> Message:
    # The owner's feed exists, so the cell's outcome is the caller's right.
    await calpb_grpc.CalendarFeedServiceStub(w.api.channel).RotateCalendarFeedToken(
        calpb.RotateCalendarFeedTokenRequest(user_id=w.owner_id), metadata=w.api.md
    )
    return calpb.RevokeCalendarFeedTokenRequest(user_id=w.owner_id)


def _webhook_request() -> whpb.CreateWebhookEndpointRequest:
    # Nothing listens there; only NO_SHOW events would be sent.
    return whpb.CreateWebhookEndpointRequest(
        url="http://127.0.0.1:9/hook", event_types=[apb.APPOINTMENT_EVENT_TYPE_NO_SHOW]
    )


async def _webhook(w: World) -> str:
    reply = await whpb_grpc.WebhookServiceStub(w.api.channel).CreateWebhookEndpoint(
        _webhook_request(), metadata=w.api.md
    )
    return reply.webhook_endpoint.id


async def _create_webhook(w: World) -> Message:
    return _webhook_request()


async def _get_webhook(w: World) -> Message:
    return whpb.GetWebhookEndpointRequest(id=await _webhook(w))


async def _list_webhooks(w: World) -> Message:
    return whpb.ListWebhookEndpointsRequest()


async def _rotate_webhook_secret(w: World) -> Message:
    return whpb.RotateWebhookSecretRequest(id=await _webhook(w))


async def _enable_webhook(w: World) -> Message:
    return whpb.EnableWebhookEndpointRequest(id=await _webhook(w))


async def _delete_webhook(w: World) -> Message:
    return whpb.DeleteWebhookEndpointRequest(id=await _webhook(w))


BUILDERS: dict[str, Builder] = {
    P + "AuthService/Login": _login,
    P + "AuthService/WhoAmI": _who_am_i,
    P + "AuthService/Logout": _logout,
    P + "UserService/CreateUser": _create_user,
    P + "UserService/GetUser": _get_user,
    P + "UserService/ListUsers": _list_users,
    P + "UserService/UpdateUser": _update_user,
    P + "SpecialistService/CreateSpecialist": _create_specialist,
    P + "SpecialistService/GetSpecialist": _get_specialist,
    P + "SpecialistService/ListSpecialists": _list_specialists,
    P + "SpecialistService/UpdateSpecialist": _update_specialist,
    P + "ScheduleService/GetSchedule": _get_schedule,
    P + "ScheduleService/UpdateSchedule": _update_schedule,
    P + "ScheduleService/MaterializeSchedule": _materialize_schedule,
    P + "SlotService/CreateSlot": _create_slot,
    P + "SlotService/BatchCreateSlots": _batch_create_slots,
    P + "SlotService/GetSlot": _get_slot,
    P + "SlotService/ListSlots": _list_slots,
    P + "SlotService/DeleteSlot": _delete_slot,
    P + "SlotService/UpdateSlotCapacity": _update_slot_capacity,
    P + "SlotService/SearchAvailableSlots": _search_slots,
    P + "AppointmentService/HoldSlot": _hold_slot,
    P + "AppointmentService/ConfirmAppointment": _confirm,
    P + "AppointmentService/CancelAppointment": _cancel,
    P + "AppointmentService/RescheduleAppointment": _reschedule,
    P + "AppointmentService/MarkNoShow": _mark_no_show,
    P + "AppointmentService/HoldSeries": _hold_series,
    P + "AppointmentService/ConfirmSeries": _confirm_series,
    P + "AppointmentService/CancelSeries": _cancel_series,
    P + "AppointmentService/GetAppointment": _get_appointment,
    P + "AppointmentService/ListAppointments": _list_appointments,
    P + "AppointmentService/ListAppointmentEvents": _list_events,
    P + "AppointmentService/WatchAppointmentEvents": _watch_events,
    P + "WaitlistService/CreateWaitlistEntry": _create_waitlist_entry,
    P + "WaitlistService/GetWaitlistEntry": _get_waitlist_entry,
    P + "WaitlistService/ListWaitlistEntries": _list_waitlist_entries,
    P + "WaitlistService/CancelWaitlistEntry": _cancel_waitlist_entry,
    P + "CalendarFeedService/RotateCalendarFeedToken": _rotate_feed,
    P + "CalendarFeedService/RevokeCalendarFeedToken": _revoke_feed,
    P + "WebhookService/CreateWebhookEndpoint": _create_webhook,
    P + "WebhookService/GetWebhookEndpoint": _get_webhook,
    P + "WebhookService/ListWebhookEndpoints": _list_webhooks,
    P + "WebhookService/RotateWebhookSecret": _rotate_webhook_secret,
    P + "WebhookService/EnableWebhookEndpoint": _enable_webhook,
    P + "WebhookService/DeleteWebhookEndpoint": _delete_webhook,
}

STREAM_FIRST_MESSAGE_TIMEOUT = 5.0


@dataclass
class Outcome:
    code: grpc.StatusCode
    detail: str = ""


async def _first(stream: Any) -> Any:
    """The first message of a server stream, or None if it ends at once."""
    async for message in stream:
        return message
    return None


async def _invoke(
    channel: grpc.aio.Channel, rpc: str, request: Message, token: str | None
) -> Outcome:
    """Calls `rpc` generically (from its descriptor); a server-streaming RPC
    counts as OK once its first message arrives."""
    method = METHODS[rpc]
    metadata = [("authorization", f"Bearer {token}")] if token else []
    response_type: Any = GetMessageClass(method.output_type)
    try:
        if method.client_streaming:
            raise NotImplementedError(f"{rpc}: client streaming is not covered yet")
        if method.server_streaming:
            stream = channel.unary_stream(
                rpc,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString,
            )(request, metadata=metadata)
            try:
                first = await asyncio.wait_for(_first(stream), STREAM_FIRST_MESSAGE_TIMEOUT)
            except TimeoutError:
                # Not a status the server sent: reported as a mismatch.
                return Outcome(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no message within {STREAM_FIRST_MESSAGE_TIMEOUT} s",
                )
            finally:
                stream.cancel()
            if first is None:
                return Outcome(grpc.StatusCode.OK, "stream ended without a message")
            return Outcome(grpc.StatusCode.OK)
        await channel.unary_unary(
            rpc,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )(request, metadata=metadata, timeout=10)
        return Outcome(grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as err:
        got = failure(err)
        return Outcome(got.code, f"{got.reason}: {got.message}")


async def _world(api: Api, server: BookingServer) -> World:
    assert server.db is not None
    users: dict[Caller, str] = {Caller.ADMIN: await api.user_id()}
    users[Caller.CLIENT], _ = await api.make_user(Role.CLIENT)
    users[Caller.OTHER_CLIENT], _ = await api.make_user(Role.CLIENT)
    users[Caller.OPERATOR], _ = await api.make_user(Role.OPERATOR)
    users[Caller.DEACTIVATED], _ = await api.make_user(Role.CLIENT)
    users[Caller.EXPIRED] = users[Caller.CLIENT]
    _, login_email = await api.make_user(Role.CLIENT)
    await api.users.UpdateUser(
        upb.UpdateUserRequest(
            user=upb.User(id=users[Caller.DEACTIVATED], active=False),
            update_mask=FieldMask(paths=["active"]),
        ),
        metadata=api.md,
    )
    specialist = await api.specialist()
    world = World(api, server.db, users, login_email, specialist.id)
    await world.owner_hold()  # so the owner has history for lists and streams
    return world


# ---------------------------------------------------------------------------
# The matrix.
# ---------------------------------------------------------------------------


def test_every_rpc_has_a_declared_policy_and_every_policy_a_real_rpc() -> None:
    rpcs = set(METHODS)
    policies = set(POLICIES)
    assert rpcs == policies, (
        f"RPCs without a policy: {sorted(rpcs - policies)}; "
        f"policies for no RPC: {sorted(policies - rpcs)}"
    )


# The rule, and the servicer helpers that apply it.
_OWNERSHIP_RULE = (
    "owner_scope(",
    "scope_to_caller(",
    "act_for(",
    "_owner(",
    "_scoped_user(",
    "_event_filter(",
)


def _handler_source(rpc: str) -> str:
    """The servicer method serving `rpc`, as source text."""
    import service.servicers

    name, method = rpc.removeprefix(P).split("/")
    classes = {
        cls.__name__: cls
        for info in pkgutil.iter_modules(service.servicers.__path__)
        for cls in vars(importlib.import_module(f"service.servicers.{info.name}")).values()
        if isinstance(cls, type) and cls.__name__.endswith("Service")
    }
    return inspect.getsource(getattr(classes[name], method))


def test_the_ownership_rule_is_declared_where_it_is_applied() -> None:
    """service/policy.py holds the one ownership rule (owner_scope,
    scope_to_caller, act_for) and marks the RPCs that apply it ``owned``;
    each such RPC's handler calls it, no other does, and in the matrix each
    refuses another CLIENT (PERMISSION_DENIED, or NOT_FOUND as if absent)
    while serving the owner."""
    applied = {
        rpc for rpc in POLICIES if any(call in _handler_source(rpc) for call in _OWNERSHIP_RULE)
    }
    declared = {rpc for rpc, policy in POLICIES.items() if policy.owned}
    assert applied == declared
    for rpc in declared:
        assert EXPECTED[(rpc, Caller.CLIENT)] == OK, rpc
        assert EXPECTED[(rpc, Caller.OTHER_CLIENT)] in (DENIED, NOT_FOUND), rpc


def test_every_rpc_has_an_expected_row_and_a_request_builder() -> None:
    assert set(EXPECTED_ROWS) == set(METHODS), (
        f"add rows to EXPECTED_ROWS for {sorted(set(METHODS) - set(EXPECTED_ROWS))}; "
        f"stale rows: {sorted(set(EXPECTED_ROWS) - set(METHODS))}"
    )
    assert set(BUILDERS) == set(METHODS), (
        f"add request builders for {sorted(set(METHODS) - set(BUILDERS))}; "
        f"stale builders: {sorted(set(BUILDERS) - set(METHODS))}"
    )


@pytest.mark.parametrize("service_name", SERVICES)
async def test_each_caller_gets_the_declared_outcome_on_every_rpc(
    api: Api, server: BookingServer, service_name: str
) -> None:
    world = await _world(api, server)
    rpcs = sorted(
        rpc for rpc, m in METHODS.items() if m.containing_service.full_name == service_name
    )
    mismatches: list[str] = []
    for rpc in rpcs:
        builder = BUILDERS.get(rpc)
        if builder is None:
            mismatches.append(f"{rpc}: no request builder in BUILDERS")
            continue
        for caller in Caller:
            expected = EXPECTED.get((rpc, caller))
            if expected is None:
                mismatches.append(f"{rpc} as {caller}: no expected outcome in EXPECTED_ROWS")
                continue
            request = await builder(world)
            assert request.DESCRIPTOR.full_name == METHODS[rpc].input_type.full_name, rpc
            outcome = await _invoke(api.channel, rpc, request, await world.token(caller))
            if outcome.code != expected:
                mismatches.append(
                    f"{rpc} as {caller}: expected {expected.name}, got {outcome.code.name}"
                    + (f" ({outcome.detail})" if outcome.detail else "")
                )
    assert not mismatches, "authorization matrix mismatches:\n" + "\n".join(mismatches)


async def test_a_method_without_a_policy_is_denied_even_to_an_admin(
    api: Api, server: BookingServer
) -> None:
    assert server.db is not None
    authenticator = auth.Authenticator(server.db, server.config)
    unknown = "/booking.v1.AppointmentService/SomeNewRpc"
    assert unknown not in POLICIES
    for metadata in ([], api.md):
        with pytest.raises(PermissionDenied) as caught:
            await authenticator.authorize(unknown, metadata)
        assert caught.value.method == unknown
    # And the same authenticator does let the ADMIN through a declared RPC.
    caller = await authenticator.authorize(P + "UserService/ListUsers", api.md)
    assert caller.role is Role.ADMIN


# ---------------------------------------------------------------------------
# Booking policies bind CLIENTs only: staff are exempt (service/policy.py
# POLICY_EXEMPT_ROLES). Each scenario acts on the owning CLIENT's behalf, as
# the owner itself or as staff, against a specialist with every limit set.
# ---------------------------------------------------------------------------

REFUSED = grpc.StatusCode.FAILED_PRECONDITION
POLICY_COLUMNS = (Role.CLIENT, Role.OPERATOR, Role.ADMIN)
LIMITS = {"min_notice_minutes": 120, "max_advance_days": 7, "cancellation_cutoff_hours": 24}

# fmt: off
POLICY_ROWS: dict[str, tuple[str, tuple[grpc.StatusCode, ...]]] = {
    # scenario                                     reason when refused            CLIENT   OPERATOR ADMIN
    "HoldSlot inside the minimum notice":          ("OUTSIDE_BOOKING_WINDOW",      (REFUSED, OK,      OK)),
    "HoldSlot beyond the maximum advance":         ("OUTSIDE_BOOKING_WINDOW",      (REFUSED, OK,      OK)),
    "CancelAppointment past the cutoff":           ("OUTSIDE_CANCELLATION_WINDOW", (REFUSED, OK,      OK)),
    "RescheduleAppointment past the cutoff":       ("OUTSIDE_CANCELLATION_WINDOW", (REFUSED, OK,      OK)),
    "RescheduleAppointment into the notice":       ("OUTSIDE_BOOKING_WINDOW",      (REFUSED, OK,      OK)),
}
# fmt: on


def test_the_policy_exemption_table_is_the_servers() -> None:
    exempt = {
        role
        for role in POLICY_COLUMNS
        if all(codes[POLICY_COLUMNS.index(role)] == OK for _, codes in POLICY_ROWS.values())
    }
    assert exempt == set(POLICY_EXEMPT_ROLES)
    assert {role for role in Role if policy_exempt(role)} == exempt


async def test_booking_policies_bind_clients_and_exempt_staff(api: Api) -> None:
    spec = await api.specialist()
    await api.specialists.UpdateSpecialist(
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id=spec.id, booking_policy=sppb.BookingPolicy(**LIMITS)),
            update_mask=FieldMask(paths=["booking_policy"]),
        ),
        metadata=api.md,
    )
    owner, owner_id = await api.client()
    callers = {
        Role.CLIENT: owner,
        Role.OPERATOR: api.as_(await api.make_token(Role.OPERATOR)),
        Role.ADMIN: api,
    }
    minutes = itertools.count()
    hours = itertools.count(3)
    now = datetime.now(UTC)

    async def soon() -> str:  # inside the two hours' notice
        return (await api.slot(spec.id, now + timedelta(minutes=5 + next(minutes)), 1)).id

    async def far() -> str:  # beyond the seven days
        return (await api.slot(spec.id, hours_from_now(24 * 8 + next(hours)))).id

    async def confirmed() -> str:  # starts within the 24 hours' cutoff
        held = await api.hold((await api.slot(spec.id, hours_from_now(next(hours)))).id, owner_id)
        await api.appointments.ConfirmAppointment(
            apb.ConfirmAppointmentRequest(id=held.id), metadata=api.md
        )
        return held.id

    async def open_slot() -> str:  # bookable by anyone
        return (await api.slot(spec.id, hours_from_now(next(hours)))).id

    async def hold_for_owner() -> str:
        return (await api.hold(await open_slot(), owner_id)).id

    scenarios: dict[str, Callable[[Api], Awaitable[Any]]] = {
        "HoldSlot inside the minimum notice": lambda c: soon_hold(c),
        "HoldSlot beyond the maximum advance": lambda c: far_hold(c),
        "CancelAppointment past the cutoff": lambda c: cancel(c),
        "RescheduleAppointment past the cutoff": lambda c: reschedule(c),
        "RescheduleAppointment into the notice": lambda c: reschedule_soon(c),
    }

    async def soon_hold(c: Api) -> Any:
        return await c.hold(await soon(), owner_id)

    async def far_hold(c: Api) -> Any:
        return await c.hold(await far(), owner_id)

    async def cancel(c: Api) -> Any:
        request = apb.CancelAppointmentRequest(id=await confirmed())
        return await c.appointments.CancelAppointment(request, metadata=c.md)

    async def reschedule(c: Api) -> Any:
        request = apb.RescheduleAppointmentRequest(
            id=await confirmed(), new_slot_id=await open_slot()
        )
        return await c.appointments.RescheduleAppointment(request, metadata=c.md)

    async def reschedule_soon(c: Api) -> Any:
        request = apb.RescheduleAppointmentRequest(
            id=await hold_for_owner(), new_slot_id=await soon()
        )
        return await c.appointments.RescheduleAppointment(request, metadata=c.md)

    assert set(scenarios) == set(POLICY_ROWS)
    mismatches = []
    for name, (reason, codes) in POLICY_ROWS.items():
        for role, expected in zip(POLICY_COLUMNS, codes, strict=True):
            try:
                await scenarios[name](callers[role])
                got, got_reason = OK, ""
            except grpc.aio.AioRpcError as err:
                decoded = failure(err)
                got, got_reason = decoded.code, decoded.reason
            if got != expected or (got == REFUSED and got_reason != reason):
                mismatches.append(
                    f"{name} as {role}: expected {expected.name}, got {got.name} {got_reason}"
                )
    assert not mismatches, "\n".join(mismatches)


# ---------------------------------------------------------------------------
# Object-level rules.
# ---------------------------------------------------------------------------


def _shape(got: RpcFailure, ids: list[str]) -> tuple[Any, ...]:
    """A failure with the ids it mentions blanked out, for comparing the
    answer about a foreign object with the answer about a missing one."""
    message = got.message
    for value in ids:
        message = message.replace(value, "<id>")
    metadata = {k: "<id>" if v in ids else v for k, v in sorted(got.metadata.items())}
    return got.code, got.reason, message, metadata, got.violations


async def test_another_clients_appointment_looks_exactly_like_a_missing_one(api: Api) -> None:
    spec = await api.specialist()
    owner, owner_id = await api.client()
    intruder, _ = await api.client()
    appointment = await owner.hold((await api.slot(spec.id, hours_from_now(30))).id)
    free_slot = (await api.slot(spec.id, hours_from_now(31))).id
    missing = str(uuid.uuid4())

    calls: dict[str, Callable[[str], Awaitable[Any]]] = {
        "GetAppointment": lambda i: intruder.appointments.GetAppointment(
            apb.GetAppointmentRequest(id=i), metadata=intruder.md
        ),
        "ConfirmAppointment": lambda i: intruder.appointments.ConfirmAppointment(
            apb.ConfirmAppointmentRequest(id=i), metadata=intruder.md
        ),
        "CancelAppointment": lambda i: intruder.appointments.CancelAppointment(
            apb.CancelAppointmentRequest(id=i), metadata=intruder.md
        ),
        "RescheduleAppointment": lambda i: intruder.appointments.RescheduleAppointment(
            apb.RescheduleAppointmentRequest(id=i, new_slot_id=free_slot), metadata=intruder.md
        ),
    }
    for name, call in calls.items():
        async with expect_failure(grpc.StatusCode.NOT_FOUND) as foreign:
            await call(appointment.id)
        async with expect_failure(grpc.StatusCode.NOT_FOUND) as absent:
            await call(missing)
        assert _shape(foreign[0], [appointment.id]) == _shape(absent[0], [missing]), name

    # Nothing happened to the owner's appointment or to the other slot.
    still = await owner.appointments.GetAppointment(
        apb.GetAppointmentRequest(id=appointment.id), metadata=owner.md
    )
    assert still.appointment.status == apb.APPOINTMENT_STATUS_HOLD
    assert still.appointment.user_id == owner_id
    slot = await api.slots.GetSlot(spb.GetSlotRequest(id=free_slot), metadata=api.md)
    assert slot.slot.status == spb.SLOT_STATUS_AVAILABLE


async def test_a_client_holds_only_for_itself_and_only_at_normal_priority(api: Api) -> None:
    spec = await api.specialist()
    client, client_id = await api.client()
    _, other_id = await api.client()
    slot = await api.slot(spec.id, hours_from_now(30))

    async with expect_failure(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
        await client.hold(slot.id, user_id=other_id)
    for priority in (apb.APPOINTMENT_PRIORITY_VIP, apb.APPOINTMENT_PRIORITY_URGENT):
        async with expect_failure(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
            await client.hold(slot.id, priority=priority)
        async with expect_failure(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
            await client.hold(slot.id, user_id=client_id, priority=priority)
    untouched = await api.slots.GetSlot(spb.GetSlotRequest(id=slot.id), metadata=api.md)
    assert untouched.slot.status == spb.SLOT_STATUS_AVAILABLE

    held = await client.hold(slot.id, user_id=client_id, priority=apb.APPOINTMENT_PRIORITY_NORMAL)
    assert held.user_id == client_id
    assert held.priority == apb.APPOINTMENT_PRIORITY_NORMAL

    # Staff may do both.
    operator = api.as_(await api.make_token(Role.OPERATOR))
    vip_slot = await api.slot(spec.id, hours_from_now(32))
    vip = await operator.hold(vip_slot.id, user_id=other_id, priority=apb.APPOINTMENT_PRIORITY_VIP)
    assert vip.user_id == other_id
    assert vip.priority == apb.APPOINTMENT_PRIORITY_VIP


async def _first_messages(
    client: Api, request: apb.WatchAppointmentEventsRequest, *, until_heartbeat: bool
) -> list[apb.WatchAppointmentEventsResponse]:
    """Stream messages up to and including the first heartbeat after the
    opening one, i.e. the whole backlog (or just the first message)."""
    call = client.appointments.WatchAppointmentEvents(request, metadata=client.md)

    async def collect() -> list[apb.WatchAppointmentEventsResponse]:
        out: list[apb.WatchAppointmentEventsResponse] = []
        heartbeats = 0
        async for message in call:
            out.append(message)
            heartbeats += message.WhichOneof("kind") == "heartbeat"
            if not until_heartbeat or heartbeats == 2:
                return out
        raise AssertionError("the stream ended")

    try:
        return await asyncio.wait_for(collect(), STREAM_FIRST_MESSAGE_TIMEOUT)
    finally:
        call.cancel()


async def test_a_client_may_not_filter_lists_by_another_user(api: Api) -> None:
    spec = await api.specialist()
    client, _ = await api.client()
    other, other_id = await api.client()
    await other.hold((await api.slot(spec.id, hours_from_now(30))).id)

    async with expect_failure(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
        await client.appointments.ListAppointments(
            apb.ListAppointmentsRequest(user_id=other_id), metadata=client.md
        )
    foreign_filter = apb.AppointmentEventFilter(user_id=other_id)
    async with expect_failure(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
        await client.appointments.ListAppointmentEvents(
            apb.ListAppointmentEventsRequest(filter=foreign_filter), metadata=client.md
        )
    async with expect_failure(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
        await _first_messages(
            client,
            apb.WatchAppointmentEventsRequest(
                filter=foreign_filter, start_position=apb.WATCH_START_POSITION_BEGINNING
            ),
            until_heartbeat=False,
        )


async def test_a_client_without_a_filter_sees_only_its_own_appointments_and_events(
    api: Api,
) -> None:
    spec = await api.specialist()
    client, client_id = await api.client()
    other, other_id = await api.client()
    mine = {
        (await client.hold((await api.slot(spec.id, hours_from_now(30 + i))).id)).id
        for i in range(2)
    }
    theirs = {
        (await other.hold((await api.slot(spec.id, hours_from_now(40 + i))).id)).id
        for i in range(2)
    }

    listed = await client.appointments.ListAppointments(
        apb.ListAppointmentsRequest(), metadata=client.md
    )
    assert {a.id for a in listed.appointments} == mine

    events = await client.appointments.ListAppointmentEvents(
        apb.ListAppointmentEventsRequest(), metadata=client.md
    )
    assert {e.appointment.id for e in events.events} == mine
    assert {e.appointment.user_id for e in events.events} == {client_id}

    streamed = await _first_messages(
        client,
        apb.WatchAppointmentEventsRequest(start_position=apb.WATCH_START_POSITION_BEGINNING),
        until_heartbeat=True,
    )
    streamed_ids = {m.event.appointment.id for m in streamed if m.WhichOneof("kind") == "event"}
    assert streamed_ids == mine

    # The filter is not vacuous: staff see everyone's.
    everyone = await api.appointments.ListAppointments(
        apb.ListAppointmentsRequest(), metadata=api.md
    )
    assert mine | theirs <= {a.id for a in everyone.appointments}
    assert other_id != client_id


async def test_permission_is_checked_before_existence(api: Api) -> None:
    client, _ = await api.client()
    operator = api.as_(await api.make_token(Role.OPERATOR))
    missing = str(uuid.uuid4())
    start = hours_from_now(30)
    denied: dict[str, tuple[Api, Callable[[Api], Awaitable[Any]]]] = {
        "CLIENT DeleteSlot": (
            client,
            lambda a: a.slots.DeleteSlot(spb.DeleteSlotRequest(id=missing), metadata=a.md),
        ),
        "CLIENT CreateSlot": (
            client,
            lambda a: a.slots.CreateSlot(
                spb.CreateSlotRequest(
                    specialist_id=missing,
                    start_time=ts(start),
                    end_time=ts(start + timedelta(minutes=30)),
                ),
                metadata=a.md,
            ),
        ),
        "CLIENT UpdateSpecialist": (
            client,
            lambda a: a.specialists.UpdateSpecialist(
                sppb.UpdateSpecialistRequest(
                    specialist=sppb.Specialist(id=missing, full_name="X"),
                    update_mask=FieldMask(paths=["full_name"]),
                ),
                metadata=a.md,
            ),
        ),
        "CLIENT MaterializeSchedule": (
            client,
            lambda a: a.schedules.MaterializeSchedule(
                sched_pb.MaterializeScheduleRequest(
                    specialist_id=missing, start_date="2030-01-01", end_date="2030-01-02"
                ),
                metadata=a.md,
            ),
        ),
        "CLIENT UpdateSchedule": (
            client,
            lambda a: a.schedules.UpdateSchedule(
                sched_pb.UpdateScheduleRequest(specialist_id=missing, schedule=sched_pb.Schedule()),
                metadata=a.md,
            ),
        ),
        "CLIENT MarkNoShow": (
            client,
            lambda a: a.appointments.MarkNoShow(apb.MarkNoShowRequest(id=missing), metadata=a.md),
        ),
        "CLIENT GetUser": (
            client,
            lambda a: a.users.GetUser(upb.GetUserRequest(id=missing), metadata=a.md),
        ),
        "CLIENT HoldSlot": (
            client,
            lambda a: a.appointments.HoldSlot(
                apb.HoldSlotRequest(slot_id=missing, user_id=str(uuid.uuid4())), metadata=a.md
            ),
        ),
        "CLIENT UpdateUser": (
            client,
            lambda a: a.users.UpdateUser(
                upb.UpdateUserRequest(
                    user=upb.User(id=missing, email="x@example.com"),
                    update_mask=FieldMask(paths=["email"]),
                ),
                metadata=a.md,
            ),
        ),
        "OPERATOR UpdateUser": (
            operator,
            lambda a: a.users.UpdateUser(
                upb.UpdateUserRequest(
                    user=upb.User(id=missing, email="x@example.com"),
                    update_mask=FieldMask(paths=["email"]),
                ),
                metadata=a.md,
            ),
        ),
    }
    for name, (caller, call) in denied.items():
        try:
            await call(caller)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (
                f"{name}: expected PERMISSION_DENIED, got {err.code().name}: {err.details()}"
            )
        else:
            raise AssertionError(f"{name}: expected PERMISSION_DENIED, but it succeeded")

    # Whereas a caller who may delete slots learns that this one is missing.
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "SLOT_NOT_FOUND"):
        await api.slots.DeleteSlot(spb.DeleteSlotRequest(id=missing), metadata=api.md)


async def test_only_an_admin_changes_roles_or_deactivates(api: Api) -> None:
    client, client_id = await api.client()
    operator_id, operator_email = await api.make_user(Role.OPERATOR)
    operator = api.as_(await api.login(operator_email))
    roles = {client_id: upb.USER_ROLE_CLIENT, operator_id: upb.USER_ROLE_OPERATOR}
    for who, target, paths, user in (
        (client, client_id, ["role"], upb.User(id=client_id, role=upb.USER_ROLE_ADMIN)),
        (client, client_id, ["active"], upb.User(id=client_id, active=False)),
        (operator, operator_id, ["role"], upb.User(id=operator_id, role=upb.USER_ROLE_ADMIN)),
        (operator, client_id, ["active"], upb.User(id=client_id, active=False)),
        (operator, client_id, ["role"], upb.User(id=client_id, role=upb.USER_ROLE_OPERATOR)),
    ):
        async with expect_failure(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"):
            await who.users.UpdateUser(
                upb.UpdateUserRequest(user=user, update_mask=FieldMask(paths=paths)),
                metadata=who.md,
            )
        reread = await api.users.GetUser(upb.GetUserRequest(id=target), metadata=api.md)
        assert reread.user.active
        assert reread.user.role == roles[target]


def test_self_sign_up_is_on_by_default() -> None:
    assert Config().allow_self_signup is True


async def test_who_may_create_which_role(api: Api) -> None:
    """With self sign-up on: anyone may create a CLIENT, only an ADMIN staff."""
    tokens: dict[str, str | None] = {
        "anonymous": None,
        "CLIENT": await api.make_token(Role.CLIENT),
        "OPERATOR": await api.make_token(Role.OPERATOR),
        "ADMIN": api.token,
    }
    allowed = {
        "anonymous": {upb.USER_ROLE_CLIENT},
        "CLIENT": {upb.USER_ROLE_CLIENT},
        "OPERATOR": {upb.USER_ROLE_CLIENT},
        "ADMIN": {upb.USER_ROLE_CLIENT, upb.USER_ROLE_OPERATOR, upb.USER_ROLE_ADMIN},
    }
    wrong: list[str] = []
    for who, token in tokens.items():
        caller = api.as_(token)
        for role in (upb.USER_ROLE_CLIENT, upb.USER_ROLE_OPERATOR, upb.USER_ROLE_ADMIN):
            expected = OK if role in allowed[who] else DENIED
            request = upb.CreateUserRequest(email=_email(), password=PASSWORD, role=role)
            try:
                reply = await caller.users.CreateUser(request, metadata=caller.md)
                got = OK
                assert reply.user.role == role
            except grpc.aio.AioRpcError as err:
                got = err.code()
            if got != expected:
                wrong.append(f"{who} creating {upb.UserRole.Name(role)}: {got.name}")
    assert not wrong, wrong
