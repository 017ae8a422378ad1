"""The one place that names the database's functions and their arguments.

Every call of a function in storage/sql/ is built here, with named
arguments (``booking_hold_slot(p_slot_id => $1, …)``), so a reordered or
added parameter is one edit, and an argument that does not exist fails
loudly instead of landing in the wrong position. storage/, the benchmark
and the tests all take their statements from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from storage.events import EVENT_COLUMNS


@dataclass(frozen=True)
class Function:
    name: str
    params: tuple[str, ...]
    # A transition returns an appointment_events row; the others one value,
    # or a row of their own (returns_row: all its columns).
    returns_event: bool = False
    returns_row: bool = False
    # The last parameter is VARIADIC: its value is one array.
    variadic: bool = False
    # A transition whose row also carries its slot's capacity as
    # slot_capacity (a hold: storage/flights.py learns from it).
    slot_capacity: bool = False

    def call(self, args: Mapping[str, str]) -> str:
        """The call expression with each parameter bound to an SQL expression."""
        if set(args) != set(self.params):
            raise TypeError(f"{self.name} takes {sorted(self.params)}, not {sorted(args)}")
        last = self.params[-1] if self.variadic else None
        bound = ", ".join(
            f"{'VARIADIC ' if p == last else ''}{p} => {args[p]}" for p in self.params
        )
        return f"{self.name}({bound})"

    def statement(self, args: Mapping[str, str] | None = None) -> str:
        """The whole statement; by default the parameters are $1, $2, … in order."""
        if args is None:
            args = {p: f"${i}" for i, p in enumerate(self.params, start=1)}
        if self.returns_event:
            # Events store no party size or series (docs/seats.md); an
            # appointment's never change, so the row as the statement began
            # shows them (a hold's own new row is not there yet:
            # storage/appointments.py fills in the size it asked for).
            if not self.slot_capacity:
                return (
                    f"SELECT {EVENT_COLUMNS}, a.party_size, a.series_id FROM {self.call(args)} e"
                    " LEFT JOIN appointments a ON a.id = e.appointment_id"
                )
            # The slot as the statement began. A hold that succeeded locked
            # the slot's row, which fails (40001) when a change committed
            # after the snapshot, so this is the capacity it held under.
            return (
                f"SELECT {EVENT_COLUMNS}, a.party_size, a.series_id,"
                f" s.capacity AS slot_capacity FROM {self.call(args)} e"
                " LEFT JOIN appointments a ON a.id = e.appointment_id"
                " LEFT JOIN time_slots s ON s.id = e.time_slot_id"
            )
        if self.returns_row:
            return f"SELECT * FROM {self.call(args)}"
        return f"SELECT {self.call(args)}"

    @cached_property
    def sql(self) -> str:
        """:meth:`statement` with $1, $2, … in order, built once (it was
        rebuilt on every call)."""
        return self.statement()

    def values(self, **kwargs: Any) -> list[Any]:
        """Positional values for :meth:`statement`, from keyword arguments
        named like the parameters without their ``p_`` prefix."""
        given = {f"p_{k}": v for k, v in kwargs.items()}
        if set(given) != set(self.params):
            raise TypeError(f"{self.name} takes {sorted(self.params)}, not {sorted(given)}")
        return [given[p] for p in self.params]


def _transition(name: str, *params: str) -> Function:
    return Function(name, params, returns_event=True)


# p_policy_exempt: whether the caller is exempt from booking policies
# (service/policy.py POLICY_EXEMPT_ROLES).
# p_party_size: the seats taken, all or none (storage/sql/seats.sql).
HOLD_SLOT = Function(
    "booking_hold_slot_v3",
    (
        "p_slot_id",
        "p_user_id",
        "p_priority",
        "p_actor_id",
        "p_hold_ttl",
        "p_check_user_overlap",
        "p_request_id",
        "p_policy_exempt",
        "p_party_size",
    ),
    returns_event=True,
    slot_capacity=True,
)
# A hold refused without reaching the slot, answered as the hold would be.
REFUSE_HOLD = _transition(
    "booking_refuse_hold",
    "p_slot_id",
    "p_user_id",
    "p_priority",
    "p_actor_id",
    "p_request_id",
    "p_status",
)
CONFIRM = _transition("booking_confirm", "p_id", "p_owner_id", "p_actor_id", "p_request_id")
CANCEL = _transition(
    "booking_cancel_v2",
    "p_id",
    "p_owner_id",
    "p_actor_id",
    "p_reason",
    "p_request_id",
    "p_policy_exempt",
)
MARK_NO_SHOW = _transition("booking_mark_no_show", "p_id", "p_actor_id", "p_request_id")
RESCHEDULE = _transition(
    "booking_reschedule_v2",
    "p_id",
    "p_new_slot_id",
    "p_owner_id",
    "p_actor_id",
    "p_check_user_overlap",
    "p_request_id",
    "p_policy_exempt",
)

EXPIRE_HOLDS = Function("booking_expire_holds", ("p_limit",))
DELETE_SLOT = Function("booking_delete_slot", ("p_slot_id",))
REMEMBER_FAILURE = Function("booking_remember_failure", ("p_key", "p_reason", "p_detail"))
FORGET_REQUEST_IDS = Function("booking_forget_request_ids", ("p_retention", "p_limit"))
PRUNE_EVENTS = Function("booking_prune_events", ("p_retention", "p_limit"))
# Request ids of operations other than the transitions (storage/requests.py).
REQUEST_OUTCOME = Function(
    "booking_request_outcome",
    ("p_operation", "p_actor_id", "p_request_id", "p_params"),
    returns_row=True,
    variadic=True,
)
FINISH_REQUEST_RESULT = Function("booking_finish_request_result", ("p_result",))

# Slots and the waitlist (storage/sql/slots.sql, waitlist.sql).
INSERT_SLOTS = Function(
    "booking_insert_slots_v2",
    ("p_specialist_ids", "p_start_times", "p_end_times", "p_capacities"),
    returns_row=True,
)
SET_SLOT_CAPACITY = Function(
    "booking_set_slot_capacity", ("p_slot_id", "p_capacity"), returns_row=True
)
CREATE_WAITLIST_ENTRY = Function(
    "booking_create_waitlist_entry_v2",
    (
        "p_user_id",
        "p_specialist_id",
        "p_service_type",
        "p_window_start",
        "p_window_end",
        "p_priority",
        "p_offer_ttl",
        "p_actor_id",
        "p_request_id",
        "p_party_size",
    ),
    returns_row=True,
)
CANCEL_WAITLIST_ENTRY = Function(
    "booking_cancel_waitlist_entry", ("p_id", "p_owner_id"), returns_row=True
)
EXPIRE_WAITLIST_ENTRIES = Function("booking_expire_waitlist_entries", ("p_limit",))

# Recurring series (storage/sql/series.sql).
HOLD_SERIES = Function(
    "booking_hold_series",
    (
        "p_first_slot_id",
        "p_user_id",
        "p_priority",
        "p_actor_id",
        "p_hold_ttl",
        "p_check_user_overlap",
        "p_request_id",
        "p_policy_exempt",
        "p_party_size",
        "p_recurrence",
        "p_all_or_nothing",
        "p_starts",
    ),
    returns_row=True,
)
SERIES_REQUEST_PARAMS = Function(
    "booking_series_request_params",
    (
        "p_first_slot_id",
        "p_user_id",
        "p_priority",
        "p_party_size",
        "p_recurrence",
        "p_all_or_nothing",
    ),
)
CONFIRM_SERIES = Function(
    "booking_confirm_series_v2", ("p_series_id", "p_owner_id", "p_actor_id", "p_request_id")
)
CANCEL_SERIES = Function(
    "booking_cancel_series_v2",
    ("p_series_id", "p_owner_id", "p_actor_id", "p_reason", "p_policy_exempt", "p_request_id"),
)
