"""What the clients and consumers saw: every request, every copy of it,
every attempt, and every event a consumer received. The checks read only
this and the database."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

TRANSITIONS = (
    "HoldSlot",
    "ConfirmAppointment",
    "CancelAppointment",
    "RescheduleAppointment",
    "MarkNoShow",
)
READS = ("GetSlot", "ListSlots", "ListAppointments")
# Whole-series holds (docs/seats.md): each occurrence's HELD event is an
# ordinary one, and the request's answer is the series, not one event.
SERIES = ("HoldSeries",)

# The event each acknowledged transition must have produced.
EVENT_OF = {
    "HoldSlot": "HELD",
    "ConfirmAppointment": "CONFIRMED",
    "CancelAppointment": "CANCELLED",
    "RescheduleAppointment": "RESCHEDULED",
    "MarkNoShow": "NO_SHOW",
}

# Answers after which a client sends the same request again (same request_id).
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"})
# Answers no client may ever get.
FORBIDDEN = frozenset({"UNKNOWN", "INTERNAL"})


@dataclass(frozen=True)
class Answer:
    """A definitive answer: the code, the ErrorInfo reason, and for a
    transition that succeeded, the appointment it left behind."""

    code: str
    reason: str = ""
    appointment_id: str = ""
    status: str = ""
    slot_id: str = ""

    def same_as(self, other: Answer) -> bool:
        return (self.code, self.reason, self.appointment_id, self.status, self.slot_id) == (
            other.code,
            other.reason,
            other.appointment_id,
            other.status,
            other.slot_id,
        )

    def brief(self) -> str:
        if self.code == "OK":
            return f"OK {self.status} {self.appointment_id[:8]}"
        return f"{self.code} {self.reason}".strip()


@dataclass
class Copy:
    """One copy of a request as a client sent it, with all its attempts
    (code and replica of each) and its definitive answer (None: gave up)."""

    attempts: list[tuple[str, int]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    answer: Answer | None = None


@dataclass
class Request:
    request_id: str
    op: str
    client: str
    caller_id: str
    started: float
    copies: list[Copy] = field(default_factory=list)

    @property
    def answers(self) -> list[Answer]:
        return [c.answer for c in self.copies if c.answer is not None]

    @property
    def acknowledged(self) -> Answer | None:
        """The success this request got, if any copy got one."""
        return next((a for a in self.answers if a.code == "OK"), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "op": self.op,
            "client": self.client,
            "caller_id": self.caller_id,
            "copies": [
                {
                    "attempts": c.attempts,
                    "answer": None if c.answer is None else c.answer.__dict__,
                }
                for c in self.copies
            ],
        }


@dataclass
class ConsumerLog:
    """What one event consumer received, in order, across reconnects."""

    name: str
    # Only this specialist's events, when set (the watch's filter).
    specialist_id: str = ""
    event_ids: list[str] = field(default_factory=list)
    event_types: list[str] = field(default_factory=list)
    connects: int = 0
    stalls: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    bad_messages: list[str] = field(default_factory=list)


@dataclass
class TokenRead:
    """A reader's read-back of its own write (chaos.readers): the write (a
    transition answered OK through one replica of the service) and what a
    read of the same appointment through another replica returned, with
    the session's tokens (`tokened`) or without any."""

    reader: str
    write_op: str
    write_request_id: str
    appointment_id: str
    # The status the write's answer named.
    write_status: str
    write_replica: int
    read_replica: int
    # GetAppointment or ListAppointments.
    method: str
    tokened: bool
    # Whether the write's answer carried a consistency token (none: the
    # read has nothing to wait for, and the check does not apply).
    token_issued: bool
    # The read's definitive code ("" when every attempt was UNAVAILABLE or
    # DEADLINE_EXCEEDED: gave up), and the code of every attempt.
    code: str = ""
    attempts: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    # The appointment as the read showed it: its status ("" when the read
    # did not show it) and update_time in microseconds since the epoch.
    status: str = ""
    update_us: int | None = None

    def brief(self) -> str:
        kind = "tokened" if self.tokened else "untokened"
        return (
            f"{self.reader}: {self.write_op} {self.write_request_id[:8]} -> "
            f"{self.write_status} of {self.appointment_id[:8]} via replica-{self.write_replica},"
            f" then {kind} {self.method} via replica-{self.read_replica}:"
            f" {self.code or 'gave up'} {self.status or '(absent)'}"
        )


@dataclass
class History:
    requests: list[Request] = field(default_factory=list)
    consumers: list[ConsumerLog] = field(default_factory=list)
    reads: list[TokenRead] = field(default_factory=list)

    def transitions(self) -> list[Request]:
        return [r for r in self.requests if r.op in TRANSITIONS]

    def attempt_codes(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for r in self.requests:
            for c in r.copies:
                out.update(code for code, _ in c.attempts)
        return out
