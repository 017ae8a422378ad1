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
class History:
    requests: list[Request] = field(default_factory=list)
    consumers: list[ConsumerLog] = field(default_factory=list)

    def transitions(self) -> list[Request]:
        return [r for r in self.requests if r.op in TRANSITIONS]

    def attempt_codes(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for r in self.requests:
            for c in r.copies:
                out.update(code for code, _ in c.attempts)
        return out
