"""Invalid input over a real gRPC channel: every malformed request is
INVALID_ARGUMENT with google.rpc.BadRequest field violations naming the
offending fields, and nothing a client sends makes the server answer
UNKNOWN or INTERNAL.

Validation happens before any database work, so the table-driven cases
share one server (module scope) instead of paying for a fresh database each.
"""

from __future__ import annotations

import os
import random
import string
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict, TypeVar

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from booking.v1 import appointment_pb2 as apb
from booking.v1 import auth_pb2
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from booking.v1 import user_pb2 as upb
from booking.v1 import webhook_pb2 as whpb
from service import pagination
from tests.support import (
    PASSWORD,
    Api,
    expect_failure,
    failure,
    hours_from_now,
    running_server,
    ts,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MIN_SECONDS = -62135596800  # 0001-01-01T00:00:00Z
MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z
SOME_ID = "00000000-0000-4000-8000-000000000000"
T0 = hours_from_now(24)
T1 = T0 + timedelta(minutes=30)


@pytest.fixture(scope="module")
async def shared(pg_admin_url: str, template_url: str) -> AsyncIterator[Api]:
    """One server on one database for the whole module. Only for requests
    that fail validation (or write nothing another test looks at)."""
    name = f"booking_invalid_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {template_url.rsplit('/', 1)[1]}")
    finally:
        await conn.close()
    url = pg_admin_url.rsplit("/", 1)[0] + "/" + name
    async with running_server(url) as server:
        async with Api.connect(server) as api:
            yield api
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


M = TypeVar("M", bound=Message)


def raw(value: int) -> Any:
    """An int passed where the generated stubs expect an enum: the wire
    carries any int32, and unknown values are what is under test."""
    return value


def _stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def _slot(
    specialist_id: str = SOME_ID, start: Timestamp | None = None, end: Timestamp | None = None
) -> spb.CreateSlotRequest:
    return spb.CreateSlotRequest(
        specialist_id=specialist_id,
        start_time=start if start is not None else ts(T0),
        end_time=end if end is not None else ts(T1),
    )


@dataclass(frozen=True)
class Case:
    stub: str
    method: str
    request: Message
    fields: list[str]

    async def call(self, api: Api) -> Any:
        rpc = getattr(getattr(api, self.stub), self.method)
        return await rpc(self.request, metadata=api.md, timeout=10)


def case(id_: str, stub: str, method: str, request: Message, *fields: str) -> Any:
    return pytest.param(Case(stub, method, request, list(fields)), id=id_)


U, SP, SL, AP, AU = "users", "specialists", "slots", "appointments", "auth"
WH = "webhooks"

MALFORMED_IDS = [
    case("GetUser.id", U, "GetUser", upb.GetUserRequest(id="not-a-uuid"), "id"),
    case(
        "UpdateUser.user.id",
        U,
        "UpdateUser",
        upb.UpdateUserRequest(
            user=upb.User(id="1234", email="x@example.com"), update_mask=FieldMask(paths=["email"])
        ),
        "user.id",
    ),
    case(
        "GetSpecialist.id",
        SP,
        "GetSpecialist",
        sppb.GetSpecialistRequest(id="00000000-0000-0000-0000-00000000000g"),
        "id",
    ),
    case(
        "UpdateSpecialist.specialist.id",
        SP,
        "UpdateSpecialist",
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id="' OR 1=1 --", full_name="X"),
            update_mask=FieldMask(paths=["full_name"]),
        ),
        "specialist.id",
    ),
    case("CreateSlot.specialist_id", SL, "CreateSlot", _slot("nope"), "specialist_id"),
    case(
        "BatchCreateSlots.requests[1].specialist_id",
        SL,
        "BatchCreateSlots",
        spb.BatchCreateSlotsRequest(requests=[_slot(), _slot("\x00")]),
        "requests[1].specialist_id",
    ),
    case("GetSlot.id", SL, "GetSlot", spb.GetSlotRequest(id="ünïcødé"), "id"),
    case("DeleteSlot.id", SL, "DeleteSlot", spb.DeleteSlotRequest(id=SOME_ID + "1"), "id"),
    case(
        "ListSlots.specialist_id",
        SL,
        "ListSlots",
        spb.ListSlotsRequest(specialist_id="x" * 1000),
        "specialist_id",
    ),
    case("HoldSlot.slot_id", AP, "HoldSlot", apb.HoldSlotRequest(slot_id="slot-1"), "slot_id"),
    case(
        "HoldSlot.user_id",
        AP,
        "HoldSlot",
        apb.HoldSlotRequest(slot_id=SOME_ID, user_id="me"),
        "user_id",
    ),
    case(
        "HoldSlot.request_id",
        AP,
        "HoldSlot",
        apb.HoldSlotRequest(slot_id=SOME_ID, request_id="retry-1"),
        "request_id",
    ),
    case(
        "ConfirmAppointment.id",
        AP,
        "ConfirmAppointment",
        apb.ConfirmAppointmentRequest(id="42"),
        "id",
    ),
    case(
        "ConfirmAppointment.request_id",
        AP,
        "ConfirmAppointment",
        apb.ConfirmAppointmentRequest(id=SOME_ID, request_id="r"),
        "request_id",
    ),
    case(
        "CancelAppointment.id",
        AP,
        "CancelAppointment",
        apb.CancelAppointmentRequest(id="-1"),
        "id",
    ),
    case(
        "CancelAppointment.request_id",
        AP,
        "CancelAppointment",
        apb.CancelAppointmentRequest(id=SOME_ID, request_id="r"),
        "request_id",
    ),
    case("MarkNoShow.id", AP, "MarkNoShow", apb.MarkNoShowRequest(id="x"), "id"),
    case(
        "MarkNoShow.request_id",
        AP,
        "MarkNoShow",
        apb.MarkNoShowRequest(id=SOME_ID, request_id="r"),
        "request_id",
    ),
    case(
        "RescheduleAppointment.ids",
        AP,
        "RescheduleAppointment",
        apb.RescheduleAppointmentRequest(id="a", new_slot_id="b", request_id="c"),
        "id",
        "new_slot_id",
        "request_id",
    ),
    case("GetAppointment.id", AP, "GetAppointment", apb.GetAppointmentRequest(id="%"), "id"),
    case(
        "ListAppointments.user_id",
        AP,
        "ListAppointments",
        apb.ListAppointmentsRequest(user_id="u"),
        "user_id",
    ),
    case(
        "ListAppointments.specialist_id",
        AP,
        "ListAppointments",
        apb.ListAppointmentsRequest(specialist_id="s"),
        "specialist_id",
    ),
    case(
        "ListAppointmentEvents.filter.specialist_id",
        AP,
        "ListAppointmentEvents",
        apb.ListAppointmentEventsRequest(filter=apb.AppointmentEventFilter(specialist_id="s")),
        "filter.specialist_id",
    ),
    case(
        "ListAppointmentEvents.filter.appointment_id",
        AP,
        "ListAppointmentEvents",
        apb.ListAppointmentEventsRequest(filter=apb.AppointmentEventFilter(appointment_id="a")),
        "filter.appointment_id",
    ),
    case(
        "ListAppointmentEvents.filter.user_id",
        AP,
        "ListAppointmentEvents",
        apb.ListAppointmentEventsRequest(filter=apb.AppointmentEventFilter(user_id="u")),
        "filter.user_id",
    ),
]

MISSING_FIELDS = [
    case("GetUser.id", U, "GetUser", upb.GetUserRequest(), "id"),
    case("CreateUser.all", U, "CreateUser", upb.CreateUserRequest(), "email", "password"),
    case(
        "UpdateUser.update_mask",
        U,
        "UpdateUser",
        upb.UpdateUserRequest(user=upb.User(id=SOME_ID, email="x@example.com")),
        "update_mask",
    ),
    case(
        "UpdateUser.user.role",
        U,
        "UpdateUser",
        upb.UpdateUserRequest(user=upb.User(id=SOME_ID), update_mask=FieldMask(paths=["role"])),
        "user.role",
    ),
    case(
        "UpdateUser.password",
        U,
        "UpdateUser",
        upb.UpdateUserRequest(user=upb.User(id=SOME_ID), update_mask=FieldMask(paths=["password"])),
        "password",
    ),
    case(
        "UpdateUser.user.id",
        U,
        "UpdateUser",
        upb.UpdateUserRequest(update_mask=FieldMask(paths=["active"])),
        "user.id",
    ),
    case("GetSpecialist.id", SP, "GetSpecialist", sppb.GetSpecialistRequest(), "id"),
    case(
        "CreateSpecialist.all",
        SP,
        "CreateSpecialist",
        sppb.CreateSpecialistRequest(),
        "full_name",
        "service_type",
    ),
    case(
        "CreateSpecialist.blank_full_name",
        SP,
        "CreateSpecialist",
        sppb.CreateSpecialistRequest(full_name=" \t ", service_type="dentist"),
        "full_name",
    ),
    case(
        "UpdateSpecialist.update_mask",
        SP,
        "UpdateSpecialist",
        sppb.UpdateSpecialistRequest(specialist=sppb.Specialist(id=SOME_ID, full_name="X")),
        "update_mask",
    ),
    case(
        "UpdateSpecialist.specialist.full_name",
        SP,
        "UpdateSpecialist",
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id=SOME_ID), update_mask=FieldMask(paths=["full_name"])
        ),
        "specialist.full_name",
    ),
    case(
        "UpdateSpecialist.specialist.id",
        SP,
        "UpdateSpecialist",
        sppb.UpdateSpecialistRequest(update_mask=FieldMask(paths=["active"])),
        "specialist.id",
    ),
    case(
        "CreateSlot.specialist_id",
        SL,
        "CreateSlot",
        spb.CreateSlotRequest(start_time=ts(T0), end_time=ts(T1)),
        "specialist_id",
    ),
    case(
        "CreateSlot.start_time",
        SL,
        "CreateSlot",
        spb.CreateSlotRequest(specialist_id=SOME_ID, end_time=ts(T1)),
        "start_time",
    ),
    case(
        "CreateSlot.end_time",
        SL,
        "CreateSlot",
        spb.CreateSlotRequest(specialist_id=SOME_ID, start_time=ts(T0)),
        "end_time",
    ),
    case(
        "CreateSlot.all",
        SL,
        "CreateSlot",
        spb.CreateSlotRequest(),
        "specialist_id",
        "start_time",
        "end_time",
    ),
    case(
        "BatchCreateSlots.requests",
        SL,
        "BatchCreateSlots",
        spb.BatchCreateSlotsRequest(),
        "requests",
    ),
    case(
        "BatchCreateSlots.requests[0].start_time",
        SL,
        "BatchCreateSlots",
        spb.BatchCreateSlotsRequest(
            requests=[spb.CreateSlotRequest(specialist_id=SOME_ID, end_time=ts(T1))]
        ),
        "requests[0].start_time",
    ),
    case("GetSlot.id", SL, "GetSlot", spb.GetSlotRequest(), "id"),
    case("DeleteSlot.id", SL, "DeleteSlot", spb.DeleteSlotRequest(), "id"),
    case("HoldSlot.slot_id", AP, "HoldSlot", apb.HoldSlotRequest(), "slot_id"),
    case("ConfirmAppointment.id", AP, "ConfirmAppointment", apb.ConfirmAppointmentRequest(), "id"),
    case("CancelAppointment.id", AP, "CancelAppointment", apb.CancelAppointmentRequest(), "id"),
    case("MarkNoShow.id", AP, "MarkNoShow", apb.MarkNoShowRequest(), "id"),
    case(
        "RescheduleAppointment.all",
        AP,
        "RescheduleAppointment",
        apb.RescheduleAppointmentRequest(),
        "id",
        "new_slot_id",
    ),
    case(
        "RescheduleAppointment.new_slot_id",
        AP,
        "RescheduleAppointment",
        apb.RescheduleAppointmentRequest(id=SOME_ID),
        "new_slot_id",
    ),
    case("GetAppointment.id", AP, "GetAppointment", apb.GetAppointmentRequest(), "id"),
    case("Login.all", AU, "Login", auth_pb2.LoginRequest(), "email", "password"),
    case("Login.password", AU, "Login", auth_pb2.LoginRequest(email="a@example.com"), "password"),
]

START_NOT_BEFORE_END = [
    case("CreateSlot.equal", SL, "CreateSlot", _slot(end=ts(T0)), "end_time"),
    case(
        "CreateSlot.reversed",
        SL,
        "CreateSlot",
        _slot(end=ts(T0 - timedelta(seconds=1))),
        "end_time",
    ),
    case(
        "CreateSlot.one_microsecond",
        SL,
        "CreateSlot",
        # 500 ns apart on the wire, equal once truncated to microseconds.
        _slot(start=_stamp(ts(T0).seconds, 1000), end=_stamp(ts(T0).seconds, 1500)),
        "end_time",
    ),
    case(
        "BatchCreateSlots.requests[1].end_time",
        SL,
        "BatchCreateSlots",
        spb.BatchCreateSlotsRequest(requests=[_slot(), _slot(start=ts(T1), end=ts(T0))]),
        "requests[1].end_time",
    ),
    case(
        "ListSlots.window",
        SL,
        "ListSlots",
        spb.ListSlotsRequest(window_start_time=ts(T0), window_end_time=ts(T0)),
        "window_end_time",
    ),
    case(
        "ListAppointments.window",
        AP,
        "ListAppointments",
        apb.ListAppointmentsRequest(window_start_time=ts(T1), window_end_time=ts(T0)),
        "window_end_time",
    ),
]

UNKNOWN_ENUMS = [
    case(
        "CreateUser.role",
        U,
        "CreateUser",
        upb.CreateUserRequest(email="a@example.com", password=PASSWORD, role=raw(99)),
        "role",
    ),
    case(
        "CreateUser.role_negative",
        U,
        "CreateUser",
        upb.CreateUserRequest(email="a@example.com", password=PASSWORD, role=raw(-1)),
        "role",
    ),
    case("ListUsers.role", U, "ListUsers", upb.ListUsersRequest(role=raw(99)), "role"),
    case(
        "UpdateUser.user.role",
        U,
        "UpdateUser",
        upb.UpdateUserRequest(
            user=upb.User(id=SOME_ID, role=raw(99)),
            update_mask=FieldMask(paths=["role"]),
        ),
        "user.role",
    ),
    case("ListSlots.status", SL, "ListSlots", spb.ListSlotsRequest(status=raw(99)), "status"),
    case(
        "HoldSlot.priority",
        AP,
        "HoldSlot",
        apb.HoldSlotRequest(slot_id=SOME_ID, priority=raw(99)),
        "priority",
    ),
    case(
        "ListAppointments.status",
        AP,
        "ListAppointments",
        apb.ListAppointmentsRequest(status=raw(99)),
        "status",
    ),
    case(
        "ListAppointmentEvents.filter.types",
        AP,
        "ListAppointmentEvents",
        apb.ListAppointmentEventsRequest(
            filter=apb.AppointmentEventFilter(types=[raw(1), raw(99), raw(0)])
        ),
        "filter.types[1]",
        "filter.types[2]",
    ),
]

NUL_TEXT = [
    case(
        "CreateUser.email",
        U,
        "CreateUser",
        upb.CreateUserRequest(email="a\x00@example.com", password=PASSWORD),
        "email",
    ),
    case(
        "CreateUser.password",
        U,
        "CreateUser",
        upb.CreateUserRequest(email="a@example.com", password="pass\x00word"),
        "password",
    ),
    case(
        "UpdateUser.user.email",
        U,
        "UpdateUser",
        upb.UpdateUserRequest(
            user=upb.User(id=SOME_ID, email="\x00"), update_mask=FieldMask(paths=["email"])
        ),
        "user.email",
    ),
    case(
        "UpdateUser.password",
        U,
        "UpdateUser",
        upb.UpdateUserRequest(
            user=upb.User(id=SOME_ID),
            update_mask=FieldMask(paths=["password"]),
            password="long enough\x00",
        ),
        "password",
    ),
    case(
        "CreateSpecialist.full_name",
        SP,
        "CreateSpecialist",
        sppb.CreateSpecialistRequest(full_name="Dr.\x00Who", service_type="dentist"),
        "full_name",
    ),
    case(
        "CreateSpecialist.service_type",
        SP,
        "CreateSpecialist",
        sppb.CreateSpecialistRequest(full_name="Dr. Who", service_type="\x00"),
        "service_type",
    ),
    case(
        "UpdateSpecialist.specialist.full_name",
        SP,
        "UpdateSpecialist",
        sppb.UpdateSpecialistRequest(
            specialist=sppb.Specialist(id=SOME_ID, full_name="a\x00", service_type="b\x00"),
            update_mask=FieldMask(paths=["full_name", "service_type"]),
        ),
        "specialist.full_name",
        "specialist.service_type",
    ),
    case(
        "ListSpecialists.service_type",
        SP,
        "ListSpecialists",
        sppb.ListSpecialistsRequest(service_type="dent\x00ist"),
        "service_type",
    ),
    case(
        "CancelAppointment.reason",
        AP,
        "CancelAppointment",
        apb.CancelAppointmentRequest(id=SOME_ID, reason="sick\x00"),
        "reason",
    ),
    case(
        "Login.email", AU, "Login", auth_pb2.LoginRequest(email="\x00", password=PASSWORD), "email"
    ),
]

TOO_LONG = [
    case(
        "CreateUser.email",
        U,
        "CreateUser",
        upb.CreateUserRequest(email="a" * 250 + "@example.com", password=PASSWORD),
        "email",
    ),
    case(
        "CreateUser.password",
        U,
        "CreateUser",
        upb.CreateUserRequest(email="a@example.com", password="p" * 129),
        "password",
    ),
    case(
        "CreateUser.password_short",
        U,
        "CreateUser",
        upb.CreateUserRequest(email="a@example.com", password="p" * 7),
        "password",
    ),
    case(
        "CreateSpecialist.full_name",
        SP,
        "CreateSpecialist",
        sppb.CreateSpecialistRequest(full_name="n" * 201, service_type="dentist"),
        "full_name",
    ),
    case(
        "CreateSpecialist.service_type",
        SP,
        "CreateSpecialist",
        sppb.CreateSpecialistRequest(full_name="Dr. Who", service_type="s" * 101),
        "service_type",
    ),
    case(
        "CancelAppointment.reason",
        AP,
        "CancelAppointment",
        apb.CancelAppointmentRequest(id=SOME_ID, reason="r" * 1001),
        "reason",
    ),
    case(
        "Login.password",
        AU,
        "Login",
        auth_pb2.LoginRequest(email="a@example.com", password="p" * 1025),
        "password",
    ),
]

BAD_EMAILS = [
    "no-at-sign",
    "@example.com",
    "a@",
    "a@localhost",
    "a b@example.com",
    "a@exa mple.com",
]

BAD_TIMESTAMPS = [
    case(
        "CreateSlot.start_time.seconds_high",
        SL,
        "CreateSlot",
        _slot(start=_stamp(MAX_SECONDS + 1)),
        "start_time",
    ),
    case(
        "CreateSlot.start_time.seconds_low",
        SL,
        "CreateSlot",
        _slot(start=_stamp(MIN_SECONDS - 1)),
        "start_time",
    ),
    case(
        "CreateSlot.start_time.seconds_huge",
        SL,
        "CreateSlot",
        _slot(start=_stamp(2**62)),
        "start_time",
    ),
    case(
        "CreateSlot.start_time.nanos_negative",
        SL,
        "CreateSlot",
        _slot(start=_stamp(ts(T0).seconds, -1)),
        "start_time",
    ),
    case(
        "CreateSlot.end_time.nanos_high",
        SL,
        "CreateSlot",
        _slot(end=_stamp(ts(T1).seconds, 10**9)),
        "end_time",
    ),
    case(
        "CreateSlot.end_time.seconds_high",
        SL,
        "CreateSlot",
        _slot(end=_stamp(MAX_SECONDS + 1)),
        "end_time",
    ),
    case(
        "CreateSlot.both",
        SL,
        "CreateSlot",
        _slot(start=_stamp(-(2**62)), end=_stamp(0, 2**31 - 1)),
        "start_time",
        "end_time",
    ),
    case(
        "BatchCreateSlots.requests[0].end_time",
        SL,
        "BatchCreateSlots",
        spb.BatchCreateSlotsRequest(requests=[_slot(end=_stamp(MAX_SECONDS + 1))]),
        "requests[0].end_time",
    ),
    case(
        "ListSlots.window_start_time",
        SL,
        "ListSlots",
        spb.ListSlotsRequest(window_start_time=_stamp(MIN_SECONDS - 1)),
        "window_start_time",
    ),
    case(
        "ListSlots.window_end_time",
        SL,
        "ListSlots",
        spb.ListSlotsRequest(window_end_time=_stamp(0, -5)),
        "window_end_time",
    ),
    case(
        "ListAppointments.window_start_time",
        AP,
        "ListAppointments",
        apb.ListAppointmentsRequest(window_start_time=_stamp(0, 10**9)),
        "window_start_time",
    ),
    case(
        "ListAppointments.window_end_time",
        AP,
        "ListAppointments",
        apb.ListAppointmentsRequest(window_end_time=_stamp(MAX_SECONDS + 1)),
        "window_end_time",
    ),
]

LISTS: list[tuple[str, str, Callable[..., Message]]] = [
    (U, "ListUsers", upb.ListUsersRequest),
    (SP, "ListSpecialists", sppb.ListSpecialistsRequest),
    (SL, "ListSlots", spb.ListSlotsRequest),
    (AP, "ListAppointments", apb.ListAppointmentsRequest),
    (AP, "ListAppointmentEvents", apb.ListAppointmentEventsRequest),
    (WH, "ListWebhookEndpoints", whpb.ListWebhookEndpointsRequest),
]

NEGATIVE_PAGE_SIZES = [
    case(f"{method}.{size}", stub, method, make(page_size=size), "page_size")
    for stub, method, make in LISTS
    for size in (-1, -(2**31))
]

BAD_TOKENS = ["garbage", "e30", "eyJ2IjoxLCJrIjpbXSwiZiI6IiJ9", "bm90IGpzb24", "%%%", "\x00", "é"]
BAD_PAGE_TOKENS = [
    case(f"{method}.{i}", stub, method, make(page_token=token), "page_token")
    for stub, method, make in LISTS
    for i, token in enumerate(BAD_TOKENS)
]

SEVERAL_AT_ONCE = [
    case(
        "ListSlots",
        SL,
        "ListSlots",
        spb.ListSlotsRequest(page_size=-1, specialist_id="x", status=raw(42)),
        "page_size",
        "specialist_id",
        "status",
    ),
    case(
        "CreateUser",
        U,
        "CreateUser",
        upb.CreateUserRequest(email="bad", password="short", role=raw(7)),
        "email",
        "password",
        "role",
    ),
    case(
        "HoldSlot",
        AP,
        "HoldSlot",
        apb.HoldSlotRequest(slot_id="s", user_id="u", priority=raw(9), request_id="r"),
        "slot_id",
        "user_id",
        "priority",
        "request_id",
    ),
]


async def _assert_invalid(api: Api, c: Case) -> None:
    async with expect_failure(INVALID, "INVALID_ARGUMENT") as box:
        await c.call(api)
    got = box[0]
    assert sorted(got.violations) == sorted(c.fields), got.message
    assert got.metadata.get("fields", "").split(",") == got.violations


@pytest.mark.parametrize("c", MALFORMED_IDS)
async def test_malformed_id_is_invalid_argument_naming_the_field(shared: Api, c: Case) -> None:
    await _assert_invalid(shared, c)


@pytest.mark.parametrize("c", MISSING_FIELDS)
async def test_missing_required_field_is_invalid_argument_naming_it(shared: Api, c: Case) -> None:
    await _assert_invalid(shared, c)


@pytest.mark.parametrize("c", START_NOT_BEFORE_END)
async def test_start_not_before_end_is_invalid_argument_naming_the_end(
    shared: Api, c: Case
) -> None:
    await _assert_invalid(shared, c)


@pytest.mark.parametrize("c", UNKNOWN_ENUMS)
async def test_unknown_enum_value_is_invalid_argument_naming_the_field(
    shared: Api, c: Case
) -> None:
    await _assert_invalid(shared, c)


@pytest.mark.parametrize("c", NUL_TEXT)
async def test_text_with_nul_is_invalid_argument_naming_the_field(shared: Api, c: Case) -> None:
    await _assert_invalid(shared, c)


@pytest.mark.parametrize("c", TOO_LONG)
async def test_text_of_the_wrong_length_is_invalid_argument_naming_the_field(
    shared: Api, c: Case
) -> None:
    await _assert_invalid(shared, c)


@pytest.mark.parametrize("email", BAD_EMAILS)
async def test_malformed_email_is_invalid_argument_naming_the_email(
    shared: Api, email: str
) -> None:
    await _assert_invalid(
        shared,
        Case(U, "CreateUser", upb.CreateUserRequest(email=email, password=PASSWORD), ["email"]),
    )
    await _assert_invalid(
        shared,
        Case(
            U,
            "UpdateUser",
            upb.UpdateUserRequest(
                user=upb.User(id=SOME_ID, email=email), update_mask=FieldMask(paths=["email"])
            ),
            ["user.email"],
        ),
    )


@pytest.mark.parametrize("c", BAD_TIMESTAMPS)
async def test_timestamp_out_of_range_is_invalid_argument_naming_the_field(
    shared: Api, c: Case
) -> None:
    await _assert_invalid(shared, c)


@pytest.mark.parametrize("c", NEGATIVE_PAGE_SIZES)
async def test_negative_page_size_is_invalid_argument(shared: Api, c: Case) -> None:
    await _assert_invalid(shared, c)


@pytest.mark.parametrize("c", BAD_PAGE_TOKENS)
async def test_bad_page_token_is_invalid_argument(shared: Api, c: Case) -> None:
    await _assert_invalid(shared, c)


@pytest.mark.parametrize("c", SEVERAL_AT_ONCE)
async def test_every_bad_field_is_reported_at_once(shared: Api, c: Case) -> None:
    await _assert_invalid(shared, c)


@pytest.mark.parametrize(
    "paths", [["nickname"], ["email", "id"], ["EMAIL"]], ids=["unknown", "mixed", "case"]
)
async def test_update_mask_with_unknown_paths_is_invalid_argument(
    shared: Api, paths: list[str]
) -> None:
    await _assert_invalid(
        shared,
        Case(
            U,
            "UpdateUser",
            upb.UpdateUserRequest(
                user=upb.User(id=SOME_ID, email="a@example.com"),
                update_mask=FieldMask(paths=paths),
            ),
            ["update_mask"],
        ),
    )
    await _assert_invalid(
        shared,
        Case(
            SP,
            "UpdateSpecialist",
            sppb.UpdateSpecialistRequest(
                specialist=sppb.Specialist(id=SOME_ID, full_name="X"),
                update_mask=FieldMask(paths=[p.replace("email", "full_name") for p in paths]),
            ),
            ["update_mask"],
        ),
    )


@pytest.mark.parametrize("cursor", ["abc", "1-", "-1", "1-2-3", "99999999999999999999-1", " 1-1"])
async def test_malformed_event_cursor_is_invalid_argument(shared: Api, cursor: str) -> None:
    await _assert_invalid(
        shared,
        Case(
            AP,
            "ListAppointmentEvents",
            apb.ListAppointmentEventsRequest(after_cursor=cursor),
            ["after_cursor"],
        ),
    )


async def test_event_cursor_with_non_ascii_digits_is_invalid_argument(shared: Api) -> None:
    # Superscript digits pass str.isdigit() but int() refuses them.
    for cursor in ["²-1", "1-²", "1-¹"]:
        await _assert_invalid(
            shared,
            Case(
                AP,
                "ListAppointmentEvents",
                apb.ListAppointmentEventsRequest(after_cursor=cursor),
                ["after_cursor"],
            ),
        )


async def test_timestamps_at_the_edges_of_the_range_are_accepted(shared: Api) -> None:
    spec = await shared.specialist("Dr. Edge")
    first = await shared.slots.CreateSlot(
        _slot(spec.id, start=_stamp(MIN_SECONDS), end=_stamp(MIN_SECONDS + 1800)),
        metadata=shared.md,
    )
    last = await shared.slots.CreateSlot(
        _slot(spec.id, start=_stamp(MAX_SECONDS - 1800), end=_stamp(MAX_SECONDS, 999_999_999)),
        metadata=shared.md,
    )
    assert first.slot.start_time.ToDatetime(tzinfo=UTC) == datetime(1, 1, 1, tzinfo=UTC)
    assert last.slot.end_time.seconds == MAX_SECONDS
    assert last.slot.end_time.nanos == 999_999_000
    listed = await shared.slots.ListSlots(
        spb.ListSlotsRequest(
            specialist_id=spec.id,
            window_start_time=_stamp(MIN_SECONDS),
            window_end_time=_stamp(MAX_SECONDS, 999_999_999),
        ),
        metadata=shared.md,
    )
    assert [s.id for s in listed.slots] == [first.slot.id, last.slot.id]


async def test_page_token_from_another_list_is_invalid_argument(shared: Api) -> None:
    await shared.specialist("Token A")
    await shared.specialist("Token B")
    page = await shared.specialists.ListSpecialists(
        sppb.ListSpecialistsRequest(page_size=1), metadata=shared.md
    )
    assert page.next_page_token
    for stub, method, make in LISTS:
        if method == "ListSpecialists":
            continue
        await _assert_invalid(
            shared, Case(stub, method, make(page_token=page.next_page_token), ["page_token"])
        )


@pytest.mark.parametrize(
    "when",
    [
        "9999-12-31T23:59:59-05:00",
        "0001-01-01T00:00:00+05:00",
        "10000-01-01T00:00:00+00:00",
        "not a time",
    ],
)
async def test_forged_page_token_with_an_impossible_position_is_invalid_argument(
    shared: Api, when: str
) -> None:
    # Tokens are opaque, but base64 JSON: a client can build one that passes
    # the filter check and carries any position at all.
    token = pagination.encode([when, SOME_ID], ["slots", None, None, None, None])
    await _assert_invalid(
        shared, Case(SL, "ListSlots", spb.ListSlotsRequest(page_token=token), ["page_token"])
    )


@pytest.mark.parametrize(
    "payload",
    [b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff"],
    ids=["bad-utf8-string", "corrupt-wire-format"],
)
async def test_undecodable_request_bytes_are_invalid_argument(shared: Api, payload: bytes) -> None:
    call = shared.channel.unary_unary(
        "/booking.v1.SlotService/GetSlot",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(payload, metadata=shared.md, timeout=10)
    got = failure(info.value)
    assert got.code == INVALID, f"{got.code}: {got.message}"
    assert "Traceback" not in got.message and "<class" not in got.message


async def test_request_id_reused_for_a_different_request_is_invalid_argument(api: Api) -> None:
    spec = await api.specialist()
    a = await api.slot(spec.id, hours_from_now(24))
    b = await api.slot(spec.id, hours_from_now(26))
    request_id = str(uuid.uuid4())
    first = await api.hold(a.id, request_id=request_id)
    assert (await api.hold(a.id, request_id=request_id)).id == first.id  # a true retry
    async with expect_failure(INVALID, "REQUEST_ID_REUSED") as box:
        await api.hold(b.id, request_id=request_id)
    slot_b = await api.slots.GetSlot(spb.GetSlotRequest(id=b.id), metadata=api.md)
    assert slot_b.slot.status == spb.SLOT_STATUS_AVAILABLE
    assert box[0].violations == ["request_id"]


# --- randomized: no UNKNOWN or INTERNAL for anything a client sends -------------

CLIENT_FAULTS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}

NASTY = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t\n",
    "null",
    "-1",
    "0",
    "1-1",
    "²-1",
    "9" * 40,
    "' OR '1'='1",
    "'); DROP TABLE users; --",
    "%s%s%n",
    "\\",
    "ünïcødé ✓ 日本",
    "\U0001f600",
    "a" * 300,
    "x@y.z",
    "Someone@Example.COM",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "{12345678-1234-5678-1234-567812345678}",
    "urn:uuid:12345678-1234-5678-1234-567812345678",
    "12345678123456781234567812345678",
    "e30",
    "eyJ2IjoxLCJrIjpbIngiLCJ5Il0sImYiOiIifQ",
]


class _Active(TypedDict, total=False):
    """`active` set or not (a request's optional field)."""

    active: bool


class Garbage:
    def __init__(self, rng: random.Random, ids: list[str]) -> None:
        self.rng = rng
        self.ids = ids

    def text(self) -> str:
        r = self.rng.random()
        if r < 0.45:
            return self.rng.choice(NASTY)
        if r < 0.6:
            return self.rng.choice(self.ids)
        if r < 0.7:
            return str(uuid.UUID(int=self.rng.getrandbits(128)))
        if r < 0.8:
            return f"{self.rng.choice(['ann', 'Bob', 'x'])}{self.rng.randint(0, 5)}@example.com"
        alphabet = string.printable + "é\u200b\ufeff\x00\x7f"
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(0, 40)))

    def id(self) -> str:
        return self.rng.choice(self.ids) if self.rng.random() < 0.7 else self.text()

    def int(self) -> int:
        return self.rng.choice(
            [0, 0, 1, 2, 3, 4, 5, 99, -1, 2**31 - 1, -(2**31), self.rng.randint(-9, 1100)]
        )

    def stamp(self) -> Timestamp | None:
        if self.rng.random() < 0.2:
            return None
        now = int(hours_from_now(0).timestamp())
        if self.rng.random() < 0.4:  # plausible: on the hour or half hour, soon
            return Timestamp(seconds=now + 1800 * self.rng.randint(0, 96))
        seconds = self.rng.choice(
            [
                0,
                -1,
                MIN_SECONDS,
                MIN_SECONDS - 1,
                MAX_SECONDS,
                MAX_SECONDS + 1,
                2**62,
                -(2**62),
                now + self.rng.randint(-(10**7), 10**7),
                now + 3600 * self.rng.randint(1, 48),
            ]
        )
        nanos = self.rng.choice(
            [0, 0, 0, -1, 10**9, 999_999_999, self.rng.randint(-(2**31), 2**31 - 1)]
        )
        return Timestamp(seconds=seconds, nanos=nanos)

    def set_stamps(self, message: M, *names: str) -> M:
        for name in names:
            value = self.stamp()
            if value is not None:
                getattr(message, name).CopyFrom(value)
        return message

    def mask(self, allowed: list[str]) -> FieldMask:
        pool = [*allowed, "id", "", "nickname"]
        return FieldMask(paths=self.rng.sample(pool, self.rng.randint(0, 3)))

    def maybe_bool(self) -> _Active:
        return {} if self.rng.random() < 0.5 else {"active": self.rng.random() < 0.5}


def _requests(g: Garbage) -> list[Callable[[], tuple[str, str, Message]]]:
    return [
        lambda: (
            U,
            "CreateUser",
            upb.CreateUserRequest(email=g.text(), password=g.text(), role=raw(g.int())),
        ),
        lambda: (U, "GetUser", upb.GetUserRequest(id=g.id())),
        lambda: (
            U,
            "ListUsers",
            upb.ListUsersRequest(
                page_size=g.int(),
                page_token=g.text(),
                role=raw(g.int()),
                **g.maybe_bool(),
            ),
        ),
        lambda: (
            U,
            "UpdateUser",
            upb.UpdateUserRequest(
                user=upb.User(id=g.id(), email=g.text(), role=raw(g.int()), active=True),
                update_mask=g.mask(["email", "password", "role"]),
                password=g.text(),
            ),
        ),
        lambda: (
            SP,
            "CreateSpecialist",
            sppb.CreateSpecialistRequest(full_name=g.text(), service_type=g.text()),
        ),
        lambda: (SP, "GetSpecialist", sppb.GetSpecialistRequest(id=g.id())),
        lambda: (
            SP,
            "ListSpecialists",
            sppb.ListSpecialistsRequest(
                page_size=g.int(), page_token=g.text(), service_type=g.text(), **g.maybe_bool()
            ),
        ),
        lambda: (
            SP,
            "UpdateSpecialist",
            sppb.UpdateSpecialistRequest(
                specialist=sppb.Specialist(id=g.id(), full_name=g.text(), service_type=g.text()),
                update_mask=g.mask(["full_name", "service_type"]),
            ),
        ),
        lambda: (
            SL,
            "CreateSlot",
            g.set_stamps(spb.CreateSlotRequest(specialist_id=g.id()), "start_time", "end_time"),
        ),
        lambda: (
            SL,
            "BatchCreateSlots",
            spb.BatchCreateSlotsRequest(
                requests=[
                    g.set_stamps(
                        spb.CreateSlotRequest(specialist_id=g.id()), "start_time", "end_time"
                    )
                    for _ in range(g.rng.randint(0, 3))
                ]
            ),
        ),
        lambda: (SL, "GetSlot", spb.GetSlotRequest(id=g.id())),
        lambda: (
            SL,
            "ListSlots",
            g.set_stamps(
                spb.ListSlotsRequest(
                    specialist_id=g.id() if g.rng.random() < 0.5 else "",
                    status=raw(g.int()),
                    page_size=g.int(),
                    page_token=g.text() if g.rng.random() < 0.5 else "",
                ),
                "window_start_time",
                "window_end_time",
            ),
        ),
        lambda: (SL, "DeleteSlot", spb.DeleteSlotRequest(id=g.id())),
        lambda: (
            AP,
            "HoldSlot",
            apb.HoldSlotRequest(
                slot_id=g.id(),
                user_id=g.id() if g.rng.random() < 0.5 else "",
                priority=raw(g.int()),
                request_id=g.id() if g.rng.random() < 0.3 else "",
            ),
        ),
        lambda: (AP, "ConfirmAppointment", apb.ConfirmAppointmentRequest(id=g.id())),
        lambda: (
            AP,
            "CancelAppointment",
            apb.CancelAppointmentRequest(id=g.id(), reason=g.text()),
        ),
        lambda: (AP, "MarkNoShow", apb.MarkNoShowRequest(id=g.id())),
        lambda: (
            AP,
            "RescheduleAppointment",
            apb.RescheduleAppointmentRequest(id=g.id(), new_slot_id=g.id()),
        ),
        lambda: (AP, "GetAppointment", apb.GetAppointmentRequest(id=g.id())),
        lambda: (
            AP,
            "ListAppointments",
            g.set_stamps(
                apb.ListAppointmentsRequest(
                    user_id=g.id() if g.rng.random() < 0.5 else "",
                    specialist_id=g.id() if g.rng.random() < 0.5 else "",
                    status=raw(g.int()),
                    page_size=g.int(),
                    page_token=g.text() if g.rng.random() < 0.5 else "",
                ),
                "window_start_time",
                "window_end_time",
            ),
        ),
        lambda: (
            AP,
            "ListAppointmentEvents",
            apb.ListAppointmentEventsRequest(
                filter=apb.AppointmentEventFilter(
                    specialist_id=g.id() if g.rng.random() < 0.5 else "",
                    appointment_id=g.id() if g.rng.random() < 0.5 else "",
                    types=[raw(g.int()) for _ in range(g.rng.randint(0, 2))],
                ),
                after_cursor=g.text() if g.rng.random() < 0.5 else "",
                page_size=g.int(),
                page_token=g.text() if g.rng.random() < 0.3 else "",
            ),
        ),
    ]


async def test_random_garbage_never_gets_unknown_or_internal(api: Api) -> None:
    rng = random.Random(20240611)
    spec = await api.specialist()
    free = await api.slot(spec.id, hours_from_now(24))
    held = await api.slot(spec.id, hours_from_now(25))
    client, client_id = await api.client()
    appointment = await client.hold(held.id)
    g = Garbage(rng, [spec.id, free.id, held.id, client_id, appointment.id])
    builders = _requests(g)
    callers = [api] * 6 + [client] * 3 + [api.as_(None)]
    seen: dict[str, int] = {}
    problems: list[str] = []
    for i in range(200):
        stub, method, request = rng.choice(builders)()
        caller = rng.choice(callers)
        try:
            await getattr(getattr(caller, stub), method)(request, metadata=caller.md, timeout=10)
            outcome = "OK"
        except grpc.aio.AioRpcError as err:
            got = failure(err)
            outcome = got.code.name
            if got.code not in CLIENT_FAULTS or not got.reason:
                problems.append(f"#{i} {method}({request!r}) -> {got.code.name}: {got.message}")
        seen[outcome] = seen.get(outcome, 0) + 1
    assert not problems, "\n".join(problems)
    # The generator must reach past validation, not only bounce off it.
    assert seen.get("INVALID_ARGUMENT", 0) > 20, seen
    assert seen.get("NOT_FOUND", 0) + seen.get("OK", 0) > 10, seen
