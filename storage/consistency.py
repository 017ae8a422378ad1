"""Read-your-writes tokens: the primary's WAL position after a commit.

A write answered OK carries a :class:`Token` (the cluster's system
identifier, the primary's timeline and its WAL position once the commit
returned); a read that passes one back is served by a standby only once
that very standby has replayed past it on the same timeline of the same
cluster, and by the primary otherwise (storage/replicas.py, docs/reads.md).

Like the deadline (storage/deadline.py), the token of the current request
travels in a context variable, so storage needs no grpc: the service sets
the caller's token before the handler runs and reads the one its writes
produced after it.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

# The metadata key, request and response alike (a trailer on answers).
HEADER = "x-booking-consistency-token"
_VERSION = "1"


@dataclass(frozen=True, order=True)
class Token:
    """A position in one cluster's WAL history. Ordered by (system,
    timeline, lsn) only to pick the newest of a caller's tokens of one
    timeline; positions of different timelines are not comparable."""

    system: int
    timeline: int
    lsn: int

    def encode(self) -> str:
        return f"{_VERSION}.{self.system:x}.{self.timeline:x}.{self.lsn:x}"

    def covers(self, other: Token) -> bool:
        """Whether a reader that has reached `self` has reached `other`."""
        return (
            self.system == other.system
            and self.timeline == other.timeline
            and self.lsn >= other.lsn
        )


# What an unreadable token stands for: no cluster's (no system identifier
# is 0), so no standby qualifies and the primary serves the read. A caller
# passing garbage is neither refused nor served stale.
UNREADABLE = Token(0, 0, 0)


def decode(text: str) -> Token | None:
    """The token `text` encodes, None if it is not one of ours."""
    parts = text.strip().split(".")
    if len(parts) != 4 or parts[0] != _VERSION:
        return None
    try:
        system, timeline, lsn = (int(p, 16) for p in parts[1:])
    except ValueError:
        return None
    if min(system, timeline, lsn) < 0 or max(system, timeline, lsn) >= 2**64:
        return None
    return Token(system, timeline, lsn)


def newest(tokens: list[Token]) -> Token | None:
    """Of several tokens a caller passed, the one a read must reach: the
    highest position on the highest timeline (a read on a standby that
    reached it has reached every older position of that history)."""
    return max(tokens, key=lambda t: (t.timeline, t.lsn), default=None)


def wanted_from(values: list[str]) -> Token | None:
    """The token a request's values of HEADER ask for: the newest; any
    unreadable one makes it UNREADABLE (the primary)."""
    tokens = [decode(v) for v in values]
    if any(t is None for t in tokens):
        return UNREADABLE
    return newest([t for t in tokens if t is not None])


@dataclass
class Request:
    """One request's consistency: the token its caller passed (None: none or
    not ours), and the newest token its writes produced."""

    wanted: Token | None = None
    issued: Token | None = None

    def record(self, token: Token) -> None:
        if self.issued is None or (token.timeline, token.lsn) >= (
            self.issued.timeline,
            self.issued.lsn,
        ):
            self.issued = token


_current: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "booking_consistency", default=None
)


def begin(wanted: Token | None) -> Request:
    """The current request (task) passes `wanted`; returns its record."""
    request = Request(wanted=wanted)
    _current.set(request)
    return request


def current() -> Request | None:
    return _current.get()
