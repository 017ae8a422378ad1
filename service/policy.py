"""Who may call what: one declared policy per RPC, deny by default.

Function-level rules (which roles may call a method) live here and are
enforced by the interceptor before the handler runs. The object-level rule
(a CLIENT only touches what is its own: its user, appointments, waitlist
entries) is here too, as the functions below; the servicers call them, and
storage is handed the owner they give. POLICIES marks the RPCs that apply
it (``owned``); tests/test_authorization_matrix.py holds each to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from service.errors import PermissionDenied
from storage.models import Priority, Role, User

EVERYONE = frozenset(Role)
STAFF = frozenset({Role.OPERATOR, Role.ADMIN})
ADMINS = frozenset({Role.ADMIN})


@dataclass(frozen=True)
class Policy:
    roles: frozenset[Role]
    # Callable without a token. CreateUser is only when self sign-up is on.
    anonymous: bool = False
    note: str = ""
    # A CLIENT may apply it only to what is its own (the functions below).
    owned: bool = False


# Who is bound by the booking policies (minimum notice, maximum advance,
# cancellation cutoff; docs/schedules.md): CLIENTs only. Staff book, cancel
# and reschedule on a client's behalf at any time. The transitions take the
# answer as p_policy_exempt; tests/test_authorization_matrix.py holds every
# role to it.
POLICY_EXEMPT_ROLES = STAFF


def policy_exempt(role: Role) -> bool:
    return role in POLICY_EXEMPT_ROLES


# --- Ownership: a CLIENT touches only what is its own -------------------------


def owner_scope(user: User) -> UUID | None:
    """The owner a caller's lookups and changes are restricted to: itself
    for a CLIENT, anyone (None) for staff. Passed down to storage, so a
    CLIENT naming someone else's object gets NOT_FOUND, exactly as if it did
    not exist."""
    return user.id if user.role is Role.CLIENT else None


def scope_to_caller(user: User, requested: UUID | None, *, what: str) -> UUID | None:
    """A user filter as the caller may use it: a CLIENT's is itself, and
    naming another user is PERMISSION_DENIED (`what` names the objects);
    staff's stays as given (None: everyone)."""
    owner = owner_scope(user)
    if owner is None:
        return requested
    if requested is not None and requested != owner:
        raise PermissionDenied(detail=f"a CLIENT may only {what}")
    return owner


def act_for(user: User, requested: UUID | None, *, what: str) -> UUID:
    """The user a request acts for: the one named, by default the caller; a
    CLIENT may act only for itself (PERMISSION_DENIED)."""
    target = requested or user.id
    scope_to_caller(user, target, what=what)
    return target


def check_priority(user: User, priority: Priority) -> None:
    """Only staff set VIP or URGENT priority."""
    if user.role is Role.CLIENT and priority is not Priority.NORMAL:
        raise PermissionDenied(detail="only operators may set VIP or URGENT priority")


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
    P + "UserService/GetUser": Policy(
        EVERYONE, note="CLIENT: self; OPERATOR and ADMIN: any", owned=True
    ),
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
        owned=True,
    ),
    P + "AppointmentService/ConfirmAppointment": Policy(
        EVERYONE, note="CLIENT: own only", owned=True
    ),
    P + "AppointmentService/CancelAppointment": Policy(
        EVERYONE,
        note="CLIENT: own only, a CONFIRMED one not past the cancellation cutoff;"
        " staff: exempt from the cutoff",
        owned=True,
    ),
    P + "AppointmentService/RescheduleAppointment": Policy(
        EVERYONE,
        note="CLIENT: own only, not past the cancellation cutoff, into the booking window;"
        " staff: exempt from both",
        owned=True,
    ),
    P + "AppointmentService/MarkNoShow": Policy(STAFF),
    P + "AppointmentService/HoldSeries": Policy(
        EVERYONE,
        note="as HoldSlot, for every occurrence: CLIENT for itself, NORMAL priority only",
        owned=True,
    ),
    P + "AppointmentService/ConfirmSeries": Policy(EVERYONE, note="CLIENT: own only", owned=True),
    P + "AppointmentService/CancelSeries": Policy(
        EVERYONE,
        note="CLIENT: own only, each occurrence as CancelAppointment",
        owned=True,
    ),
    P + "AppointmentService/GetAppointment": Policy(EVERYONE, note="CLIENT: own only", owned=True),
    P + "AppointmentService/ListAppointments": Policy(
        EVERYONE, note="CLIENT: own only", owned=True
    ),
    P + "AppointmentService/ListAppointmentEvents": Policy(
        EVERYONE, note="CLIENT: own only", owned=True
    ),
    P + "AppointmentService/WatchAppointmentEvents": Policy(
        EVERYONE, note="CLIENT: own only", owned=True
    ),
    P + "WaitlistService/CreateWaitlistEntry": Policy(
        EVERYONE, note="CLIENT: for itself, NORMAL priority only", owned=True
    ),
    P + "WaitlistService/GetWaitlistEntry": Policy(EVERYONE, note="CLIENT: own only", owned=True),
    P + "WaitlistService/ListWaitlistEntries": Policy(
        EVERYONE, note="CLIENT: own only", owned=True
    ),
    P + "WaitlistService/CancelWaitlistEntry": Policy(
        EVERYONE, note="CLIENT: own only", owned=True
    ),
    P + "CalendarFeedService/RotateCalendarFeedToken": Policy(
        EVERYONE, note="CLIENT: its own user feed; staff: any user's or specialist's", owned=True
    ),
    P + "CalendarFeedService/RevokeCalendarFeedToken": Policy(
        EVERYONE, note="CLIENT: its own user feed; staff: any user's or specialist's", owned=True
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
