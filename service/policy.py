"""Who may call what: one declared policy per RPC, deny by default.

Function-level rules (which roles may call a method) live here and are
enforced by the interceptor before the handler runs. Object-level rules (a
CLIENT only touches its own appointments) are enforced by the servicers,
mostly by passing the caller as the required owner down to storage.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.models import Role

EVERYONE = frozenset(Role)
STAFF = frozenset({Role.OPERATOR, Role.ADMIN})
ADMINS = frozenset({Role.ADMIN})


@dataclass(frozen=True)
class Policy:
    roles: frozenset[Role]
    # Callable without a token. CreateUser is only when self sign-up is on.
    anonymous: bool = False
    note: str = ""


# Who is bound by the booking policies (minimum notice, maximum advance,
# cancellation cutoff; docs/schedules.md): CLIENTs only. Staff book, cancel
# and reschedule on a client's behalf at any time. The transitions take the
# answer as p_policy_exempt; tests/test_authorization_matrix.py holds every
# role to it.
POLICY_EXEMPT_ROLES = STAFF


def policy_exempt(role: Role) -> bool:
    return role in POLICY_EXEMPT_ROLES


P = "/booking.v1."

POLICIES: dict[str, Policy] = {
    P + "AuthService/Login": Policy(frozenset(), anonymous=True, note="anyone"),
    P + "AuthService/WhoAmI": Policy(EVERYONE),
    P + "AuthService/Logout": Policy(EVERYONE),
    P + "UserService/CreateUser": Policy(
        EVERYONE,
        anonymous=True,
        note="ADMIN: any role; OPERATOR: CLIENTs; others: CLIENT self sign-up if enabled",
    ),
    P + "UserService/GetUser": Policy(EVERYONE, note="CLIENT: self; OPERATOR and ADMIN: any"),
    P + "UserService/ListUsers": Policy(STAFF),
    P + "UserService/UpdateUser": Policy(
        EVERYONE,
        note="self: email and password; ADMIN: anyone, also role and active",
    ),
    P + "SpecialistService/CreateSpecialist": Policy(STAFF),
    P + "SpecialistService/GetSpecialist": Policy(EVERYONE),
    P + "SpecialistService/ListSpecialists": Policy(EVERYONE),
    P + "SpecialistService/UpdateSpecialist": Policy(STAFF),
    P + "ScheduleService/GetSchedule": Policy(STAFF),
    P + "ScheduleService/UpdateSchedule": Policy(STAFF),
    P + "ScheduleService/MaterializeSchedule": Policy(STAFF),
    P + "SlotService/CreateSlot": Policy(STAFF),
    P + "SlotService/BatchCreateSlots": Policy(STAFF),
    P + "SlotService/GetSlot": Policy(EVERYONE),
    P + "SlotService/ListSlots": Policy(EVERYONE),
    P + "SlotService/DeleteSlot": Policy(STAFF),
    P + "SlotService/UpdateSlotCapacity": Policy(STAFF),
    P + "SlotService/SearchAvailableSlots": Policy(EVERYONE),
    P + "AppointmentService/HoldSlot": Policy(
        EVERYONE,
        note="CLIENT: for itself, NORMAL priority only, inside the booking window;"
        " staff: exempt from the window",
    ),
    P + "AppointmentService/ConfirmAppointment": Policy(EVERYONE, note="CLIENT: own only"),
    P + "AppointmentService/CancelAppointment": Policy(
        EVERYONE,
        note="CLIENT: own only, a CONFIRMED one not past the cancellation cutoff;"
        " staff: exempt from the cutoff",
    ),
    P + "AppointmentService/RescheduleAppointment": Policy(
        EVERYONE,
        note="CLIENT: own only, not past the cancellation cutoff, into the booking window;"
        " staff: exempt from both",
    ),
    P + "AppointmentService/MarkNoShow": Policy(STAFF),
    P + "AppointmentService/HoldSeries": Policy(
        EVERYONE,
        note="as HoldSlot, for every occurrence: CLIENT for itself, NORMAL priority only",
    ),
    P + "AppointmentService/ConfirmSeries": Policy(EVERYONE, note="CLIENT: own only"),
    P + "AppointmentService/CancelSeries": Policy(
        EVERYONE, note="CLIENT: own only, each occurrence as CancelAppointment"
    ),
    P + "AppointmentService/GetAppointment": Policy(EVERYONE, note="CLIENT: own only"),
    P + "AppointmentService/ListAppointments": Policy(EVERYONE, note="CLIENT: own only"),
    P + "AppointmentService/ListAppointmentEvents": Policy(EVERYONE, note="CLIENT: own only"),
    P + "AppointmentService/WatchAppointmentEvents": Policy(EVERYONE, note="CLIENT: own only"),
    P + "WaitlistService/CreateWaitlistEntry": Policy(
        EVERYONE, note="CLIENT: for itself, NORMAL priority only"
    ),
    P + "WaitlistService/GetWaitlistEntry": Policy(EVERYONE, note="CLIENT: own only"),
    P + "WaitlistService/ListWaitlistEntries": Policy(EVERYONE, note="CLIENT: own only"),
    P + "WaitlistService/CancelWaitlistEntry": Policy(EVERYONE, note="CLIENT: own only"),
    P + "CalendarFeedService/RotateCalendarFeedToken": Policy(
        EVERYONE, note="CLIENT: its own user feed; staff: any user's or specialist's"
    ),
    P + "CalendarFeedService/RevokeCalendarFeedToken": Policy(
        EVERYONE, note="CLIENT: its own user feed; staff: any user's or specialist's"
    ),
    P + "WebhookService/CreateWebhookEndpoint": Policy(STAFF),
    P + "WebhookService/GetWebhookEndpoint": Policy(STAFF),
    P + "WebhookService/ListWebhookEndpoints": Policy(STAFF),
    P + "WebhookService/RotateWebhookSecret": Policy(STAFF),
    P + "WebhookService/EnableWebhookEndpoint": Policy(STAFF),
    P + "WebhookService/DeleteWebhookEndpoint": Policy(STAFF),
}

# Infrastructure anyone may call: health checks and reflection.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
