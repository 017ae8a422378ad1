"""One hold per slot at a time reaches the database from this process; the
callers that arrive meanwhile learn from its outcome.

A herd of callers wanting one slot used to reach PostgreSQL together: all
but one waited on the slot's row lock, failed with 40001 once the winner
committed, and retried to be told SLOT_UNAVAILABLE. Here the first caller
for a slot (the leader) goes to the database and the others (followers)
wait for its outcome:

- the leader's hold committed and its answer shows it took the last seat
  (one seat of a slot of one, the slot's capacity read by the same
  statement): the slot has been occupied by a committed hold during every
  follower's call, so each is refused SLOT_UNAVAILABLE, with the detail
  the database would give (the slot, status HOLD), without a round trip: a
  herd on a one-seat slot costs one statement, as before seats;
- the leader's hold committed otherwise: that says nothing about the next
  one, as the slot may have seats left (docs/seats.md), so the next
  follower leads and the others follow it;
- the leader was refused SLOT_UNAVAILABLE by the database: a committed
  occupant held the slot at the leader's snapshot, which falls inside the
  call of every follower that arrived before the leader's statement was
  sent. Those are refused the same way; a follower that arrived later
  could have missed the occupant leaving, so it asks again (and, leading
  or following the next flight, it arrived before that one's statement);
- anything else (the user's own overlap or state, a missing or inactive
  slot, a conflict, an outage, the deadline, the leader's client going
  away): the outcome says nothing about the slot for the others, so the
  next follower becomes the leader and goes to the database itself.

A hold with a request id follows but never leads: its own outcome may be
a replay of an old one (a success whose hold has long been cancelled says
nothing about the slot now). When it is to be refused, the refusal is
recorded in the database instead of the hold (booking_refuse_hold, one
cheap statement that takes no lock on the slot), so the id gets the answer
the hold would have given: a replay of its first outcome if it has one,
else SLOT_UNAVAILABLE, remembered for its retries. Without a flight to
follow, it goes to the database as before.

Scope is one server process: replicas still meet in the database, where
the row lock and the snapshot check keep them correct, only less
coalesced. No transaction is held while anyone waits here: the leader's
transaction is its own single statement, and followers hold nothing.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from typing import TypeVar
from uuid import UUID

from storage import deadline
from storage.errors import DeadlineExceeded, SlotUnavailable

T = TypeVar("T")


class Outcome(enum.Enum):
    # The leader's hold committed (a seat is taken; others may be free).
    HELD = "held"
    # The database refused the leader SLOT_UNAVAILABLE with this status.
    OCCUPIED = "occupied"
    # The leader's hold committed and took the slot's last seat.
    FULL = "full"
    # Nothing a follower can reuse.
    UNKNOWN = "unknown"


class _Flight:
    """One leader's hold in flight. Costs the leader nothing beyond the
    slot's dict entry: the Event its followers wait on is made by the first
    follower (an uncontended hold creates none and sets none)."""

    __slots__ = ("done", "ended", "outcome", "sent", "status")

    def __init__(self) -> None:
        self.done: asyncio.Event | None = None
        self.ended = False
        self.outcome = Outcome.UNKNOWN
        self.status = ""
        # The arrival count when the leader's statement (last) went to the
        # database; None before it did.
        self.sent: int | None = None

    def finished(self) -> None:
        self.ended = True
        if self.done is not None:
            self.done.set()


def _nothing() -> None:
    pass


class SlotFlights:
    """The holds in flight in this process, one per slot."""

    def __init__(self) -> None:
        self._flights: dict[UUID, _Flight] = {}
        # Callers answered from a leader's outcome, and callers waiting for
        # one now (for tests and metrics).
        self.coalesced = 0
        self.waiting = 0
        # Callers that have arrived so far: orders arrivals and statements.
        self._arrivals = 0

    def in_flight(self, slot_id: UUID) -> bool:
        return slot_id in self._flights

    async def hold(
        self,
        slot_id: UUID,
        lead: Callable[[Callable[[], None]], Awaitable[T]],
        refuse: Callable[[str], Awaitable[T]] | None = None,
        full: Callable[[T], bool] | None = None,
    ) -> T:
        """Run ``lead(sending)`` as the slot's leader, or follow the leader
        in flight. `lead` must call ``sending()`` just before its statement
        goes to the database (on every attempt).

        With `refuse`, the caller never leads (without a flight it runs
        `lead` on its own), and a refusal is ``refuse(status)`` instead of
        SlotUnavailable raised here. With `full`, a leader's result for
        which it is true (its own answer shows every seat taken when it
        committed) answers the followers as a refusal does."""
        self._arrivals += 1
        arrival = self._arrivals
        while True:
            flight = self._flights.get(slot_id)
            if flight is None:
                if refuse is not None:
                    return await lead(_nothing)
                return await self._lead(slot_id, lead, full)
            self.waiting += 1
            try:
                await self._wait(flight)
            finally:
                self.waiting -= 1
            if flight.outcome is Outcome.FULL or (
                flight.outcome is Outcome.OCCUPIED
                and flight.sent is not None
                and arrival <= flight.sent
            ):
                self.coalesced += 1
                if refuse is not None:
                    return await refuse(flight.status)
                raise SlotUnavailable(slot_id=str(slot_id), status=flight.status)
            # The next follower to get here leads; the others follow it.

    async def _lead(
        self,
        slot_id: UUID,
        lead: Callable[[Callable[[], None]], Awaitable[T]],
        full: Callable[[T], bool] | None = None,
    ) -> T:
        flight = _Flight()
        self._flights[slot_id] = flight

        def sending() -> None:
            flight.sent = self._arrivals

        # Any other failure, cancellation included, leaves the outcome
        # UNKNOWN: followers neither hang nor learn anything from it.
        try:
            result = await lead(sending)
        except SlotUnavailable as exc:
            flight.outcome, flight.status = Outcome.OCCUPIED, exc.status
            raise
        else:
            # A hold that took the last seat: the slot is full from its
            # commit on, during the call of every follower still waiting.
            if full is not None and full(result):
                flight.outcome, flight.status = Outcome.FULL, "HOLD"
            else:
                flight.outcome, flight.status = Outcome.HELD, "HOLD"
            return result
        finally:
            # Whatever happened, the flight ends and its followers wake.
            if self._flights.get(slot_id) is flight:
                del self._flights[slot_id]
            flight.finished()

    @staticmethod
    async def _wait(flight: _Flight) -> None:
        """Wait for the leader, within the caller's own deadline."""
        limit = deadline.remaining()
        if limit is not None and limit <= 0:
            raise DeadlineExceeded()
        if flight.ended:
            return
        done = flight.done
        if done is None:
            done = flight.done = asyncio.Event()
        if limit is None:
            await done.wait()
            return
        try:
            async with asyncio.timeout(limit):
                await done.wait()
        except TimeoutError as exc:
            raise DeadlineExceeded() from exc
