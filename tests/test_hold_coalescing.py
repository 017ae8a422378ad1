"""Concurrent holds of one slot reach the database one at a time per
server, and the callers that waited are answered from the outcome only when
it shows the slot taken by a committed hold (storage/flights.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc
from storage import appointments as store
from storage import deadline
from storage import functions as fn
from storage.errors import DeadlineExceeded, SlotUnavailable, UserInactive
from storage.flights import SlotFlights
from storage.models import Priority, Role
from tests.population import fetch, insert_clients
from tests.support import Api, failure, hours_from_now

FOLLOWERS = 8


async def _until(predicate: Callable[[], Awaitable[object]], what: str) -> None:
    for _ in range(3000):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


async def _backends_waiting(database_url: str) -> int:
    rows = await fetch(
        database_url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE '%booking_hold_slot%'",
    )
    return int(rows[0]["n"])


class _Herd:
    """Real clients, each on its own channel, holding one slot as an
    operator on behalf of distinct users."""

    def __init__(self, api: Api, slot_id: str, users: list[str], token: str) -> None:
        self.target = f"127.0.0.1:{api.server.port}"
        self.slot_id = slot_id
        self.users = users
        self.md = [("authorization", f"Bearer {token}")]
        self.channels: list[grpc.aio.Channel] = []

    def call(self, i: int, request_id: str = "", seconds: float = 30) -> Any:
        channel = grpc.aio.insecure_channel(self.target)
        self.channels.append(channel)
        stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
        return stub.HoldSlot(
            apb.HoldSlotRequest(slot_id=self.slot_id, user_id=self.users[i], request_id=request_id),
            metadata=self.md,
            timeout=seconds,
        )

    async def close(self) -> None:
        await asyncio.gather(*(ch.close(None) for ch in self.channels))


async def _answer(call: Any) -> tuple[Any, ...]:
    try:
        reply = await call
    except asyncio.CancelledError:
        if not call.cancelled():
            raise
        return (grpc.StatusCode.CANCELLED,)
    except grpc.aio.AioRpcError as err:
        got = failure(err)
        return (got.code, got.reason, tuple(sorted(got.metadata.items())))
    return ("OK", reply.appointment.status)


async def _setup(api: Api, database_url: str, n: int) -> tuple[_Herd, Any, asyncpg.Connection]:
    """A herd for a fresh slot whose row an outside transaction has locked."""
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(70 + n))
    users = await insert_clients(database_url, n)
    herd = _Herd(api, slot.id, users, await api.make_token(Role.OPERATOR))
    conn = await asyncpg.connect(database_url)
    tx = conn.transaction()
    await tx.start()
    await conn.execute("SELECT 1 FROM time_slots WHERE id = $1 FOR UPDATE", uuid.UUID(slot.id))
    return herd, tx, conn


async def _live(database_url: str, slot_id: str) -> list[str]:
    rows = await fetch(
        database_url,
        "SELECT status FROM appointments WHERE time_slot_id = $1 AND status <> 'CANCELLED'",
        uuid.UUID(slot_id),
    )
    return [r["status"] for r in rows]


async def test_callers_waiting_on_a_hold_that_takes_the_last_seat_are_refused_at_once(
    api: Api, database_url: str
) -> None:
    """A committed hold of the one seat of a one-seat slot answers every
    follower that came before its statement: the herd costs one statement.
    (Without the capacity in the hold's answer, one follower would lead
    next and only the others would be coalesced: FOLLOWERS - 1.)"""
    flights = api.server.hold_flights
    herd, tx, conn = await _setup(api, database_url, FOLLOWERS + 1)
    try:
        leader = asyncio.ensure_future(_answer(herd.call(0)))
        await _until(lambda: _backends_waiting(database_url), "the leader waits on the row lock")
        coalesced = flights.coalesced
        followers = [asyncio.ensure_future(_answer(herd.call(i))) for i in range(1, FOLLOWERS + 1)]

        async def all_follow() -> bool:
            return flights.waiting == FOLLOWERS

        await _until(all_follow, "every follower waits for the leader")
        # Only the leader reached the database.
        assert await _backends_waiting(database_url) == 1
        await tx.rollback()

        assert await asyncio.wait_for(leader, 30) == ("OK", apb.APPOINTMENT_STATUS_HOLD)
        refusals = await asyncio.wait_for(asyncio.gather(*followers), 30)
    finally:
        await conn.close()
        await herd.close()

    expected = (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SLOT_UNAVAILABLE",
        (("slot_id", herd.slot_id), ("status", "HOLD")),
    )
    assert refusals == [expected] * FOLLOWERS
    assert flights.coalesced - coalesced == FOLLOWERS
    assert await _live(database_url, herd.slot_id) == ["HOLD"]


async def test_callers_waiting_on_a_hold_of_a_slot_with_seats_left_still_reach_the_database(
    api: Api, database_url: str
) -> None:
    """A committed hold of a two-seat slot leaves a seat: no follower is
    refused for it. The next leader wins the second seat, and only then are
    the rest refused (by its refusal or the database's)."""
    flights = api.server.hold_flights
    herd, tx, conn = await _setup(api, database_url, FOLLOWERS + 1)
    try:
        await conn.execute(
            "UPDATE time_slots SET capacity = 2 WHERE id = $1", uuid.UUID(herd.slot_id)
        )
        leader = asyncio.ensure_future(_answer(herd.call(0)))
        await _until(lambda: _backends_waiting(database_url), "the leader waits on the row lock")
        followers = [asyncio.ensure_future(_answer(herd.call(i))) for i in range(1, FOLLOWERS + 1)]

        async def all_follow() -> bool:
            return flights.waiting == FOLLOWERS

        await _until(all_follow, "every follower waits for the leader")
        await tx.commit()
        first = await asyncio.wait_for(leader, 30)
        answers = await asyncio.wait_for(asyncio.gather(*followers), 30)
    finally:
        await conn.close()
        await herd.close()

    # The leader read the slot before the capacity change committed: it is
    # retried (40001) and wins a seat either way.
    assert first == ("OK", apb.APPOINTMENT_STATUS_HOLD)
    codes = Counter(a[0] for a in answers)
    assert codes == {"OK": 1, grpc.StatusCode.FAILED_PRECONDITION: FOLLOWERS - 1}
    assert await _live(database_url, herd.slot_id) == ["HOLD", "HOLD"]


@pytest.mark.parametrize("how", ["deadline", "cancel"])
async def test_when_the_leader_gives_up_a_waiting_caller_can_still_win(
    api: Api, database_url: str, how: str
) -> None:
    flights = api.server.hold_flights
    herd, tx, conn = await _setup(api, database_url, FOLLOWERS + 1)
    try:
        leader_call = herd.call(0, seconds=4 if how == "deadline" else 30)
        leader = asyncio.ensure_future(_answer(leader_call))
        await _until(lambda: _backends_waiting(database_url), "the leader waits on the row lock")
        followers = [asyncio.ensure_future(_answer(herd.call(i))) for i in range(1, FOLLOWERS + 1)]

        async def all_follow() -> bool:
            return flights.waiting == FOLLOWERS

        await _until(all_follow, "every follower waits for the leader")
        if how == "cancel":
            leader_call.cancel()
        given_up = await asyncio.wait_for(leader, 30)

        # The next caller leads: it reaches the database and waits there.
        async def next_leader_waits() -> bool:
            return flights.waiting == FOLLOWERS - 1 and await _backends_waiting(database_url) == 1

        await _until(next_leader_waits, "a follower leads in its turn")
        await tx.rollback()
        answers = await asyncio.wait_for(asyncio.gather(*followers), 30)
    finally:
        await conn.close()
        await herd.close()

    if how == "deadline":
        assert given_up[0] == grpc.StatusCode.DEADLINE_EXCEEDED, given_up
    else:
        assert given_up[0] == grpc.StatusCode.CANCELLED, given_up
    codes = Counter(a[0] for a in answers)
    assert codes == {"OK": 1, grpc.StatusCode.FAILED_PRECONDITION: FOLLOWERS - 1}, answers
    assert {a[1] for a in answers if a[0] != "OK"} == {"SLOT_UNAVAILABLE"}
    assert await _live(database_url, herd.slot_id) == ["HOLD"]


async def test_a_waiting_hold_with_a_request_id_is_refused_and_its_refusal_remembered(
    api: Api, database_url: str
) -> None:
    flights = api.server.hold_flights
    herd, tx, conn = await _setup(api, database_url, 3)
    request_id = str(uuid.uuid4())
    try:
        leader = asyncio.ensure_future(_answer(herd.call(0)))
        await _until(lambda: _backends_waiting(database_url), "the leader waits on the row lock")
        copy = asyncio.ensure_future(_answer(herd.call(1, request_id=request_id)))

        async def follows() -> bool:
            return flights.waiting == 1

        await _until(follows, "the request with an id waits for the leader")
        assert await _backends_waiting(database_url) == 1
        await tx.rollback()
        won = await asyncio.wait_for(leader, 30)
        refused = await asyncio.wait_for(copy, 30)
    finally:
        await conn.close()

    assert won == ("OK", apb.APPOINTMENT_STATUS_HOLD)
    assert refused == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SLOT_UNAVAILABLE",
        (("slot_id", herd.slot_id), ("status", "HOLD")),
    )
    keys = await fetch(
        database_url,
        "SELECT operation, event_id, error_reason FROM idempotency_keys WHERE request_id = $1",
        uuid.UUID(request_id),
    )
    assert [tuple(k) for k in keys] == [("HoldSlot", None, "SLOT_UNAVAILABLE")]
    # The slot frees up: a retry of the refused request still gets its first
    # answer, and the id with other parameters is refused as reused.
    await fetch(
        database_url,
        "UPDATE appointments SET status = 'CANCELLED', expires_at = NULL WHERE time_slot_id = $1",
        uuid.UUID(herd.slot_id),
    )
    await fetch(
        database_url,
        "UPDATE time_slots SET status = 'AVAILABLE' WHERE id = $1",
        uuid.UUID(herd.slot_id),
    )
    try:
        retried = await _answer(herd.call(1, request_id=request_id))
        reused = await _answer(herd.call(2, request_id=request_id))
    finally:
        await herd.close()
    assert retried == refused
    assert reused[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")


async def test_the_refusal_of_a_waiting_hold_replays_what_its_request_id_already_has(
    api: Api, database_url: str
) -> None:
    """booking_refuse_hold answers as the hold would: a replay of the id's
    first outcome, else SLOT_UNAVAILABLE remembered under the id."""
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(95))
    (user,) = await insert_clients(database_url, 1)
    actor = uuid.UUID(await api.user_id())
    request_id = uuid.uuid4()
    db = api.server.db
    assert db is not None
    held = await store.hold(
        db,
        api.server.hold_flights,
        slot_id=uuid.UUID(slot.id),
        user_id=uuid.UUID(user),
        priority=Priority.NORMAL,
        actor_id=actor,
        hold_ttl=timedelta(minutes=5),
        check_user_overlap=True,
        request_id=request_id,
        policy_exempt=True,
    )
    conn = await asyncpg.connect(
        database_url, server_settings={"default_transaction_isolation": "repeatable read"}
    )
    try:
        replayed = await conn.fetchrow(
            fn.REFUSE_HOLD.sql, uuid.UUID(slot.id), uuid.UUID(user), "NORMAL", actor,
            request_id, "HOLD",
        )  # fmt: skip
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.fetchrow(
                fn.REFUSE_HOLD.sql, uuid.UUID(slot.id), uuid.UUID(user), "NORMAL", actor,
                uuid.uuid4(), "HOLD",
            )  # fmt: skip
        with pytest.raises(asyncpg.PostgresError) as reused:
            await conn.fetchrow(
                fn.REFUSE_HOLD.sql, uuid.UUID(slot.id), actor, "NORMAL", actor,
                request_id, "HOLD",
            )  # fmt: skip
    finally:
        await conn.close()

    assert replayed is not None and replayed["id"] == held.id
    assert refused.value.sqlstate == "BK001"
    assert getattr(refused.value, "message", "") == "SLOT_UNAVAILABLE"
    assert getattr(refused.value, "hint", "")  # the key storage/ remembers it under
    assert getattr(reused.value, "message", "") == "REQUEST_ID_REUSED"


# -- the coalescing itself, without a server --------------------------------


async def _started(flights: SlotFlights, slot: uuid.UUID, lead: Any) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(flights.hold(slot, lead))
    await asyncio.sleep(0)
    return task


async def test_only_followers_that_came_before_the_statement_reuse_an_occupied_slot() -> None:
    flights = SlotFlights()
    slot = uuid.uuid4()
    send = asyncio.Event()
    release = asyncio.Event()
    led: list[str] = []

    def leader(name: str) -> Callable[[Callable[[], None]], Awaitable[str]]:
        async def lead(sending: Callable[[], None]) -> str:
            led.append(name)
            await send.wait()
            sending()
            await release.wait()
            await asyncio.sleep(0.01)  # the database's round trip
            raise SlotUnavailable(slot_id=str(slot), status="BOOKED")

        return lead

    first = await _started(flights, slot, leader("first"))
    early = await _started(flights, slot, leader("early"))
    # The first leader now sends its statement: whoever arrives later could
    # have missed the occupant leaving, so it asks the database itself.
    send.set()
    await asyncio.sleep(0)
    late = [await _started(flights, slot, leader(f"late{i}")) for i in range(3)]
    release.set()
    results = await asyncio.gather(first, early, *late, return_exceptions=True)

    # One of the late callers leads the next flight; the other two arrived
    # before its statement, so its answer is theirs.
    assert led[0] == "first" and len(led) == 2 and led[1].startswith("late"), led
    assert all(isinstance(r, SlotUnavailable) and r.status == "BOOKED" for r in results)
    assert flights.coalesced == 3


async def test_a_leader_failing_for_itself_teaches_followers_nothing() -> None:
    flights = SlotFlights()
    slot = uuid.uuid4()
    release = asyncio.Event()
    led: list[int] = []

    async def fails(sending: Callable[[], None]) -> str:
        led.append(0)
        await release.wait()
        raise UserInactive(user_id="u")

    async def wins(sending: Callable[[], None]) -> str:
        led.append(1)
        sending()
        await asyncio.sleep(0.01)  # the database's round trip
        return "held"

    first = await _started(flights, slot, fails)
    second = await _started(flights, slot, wins)
    third = await _started(flights, slot, wins)
    release.set()
    results = await asyncio.gather(first, second, third, return_exceptions=True)

    assert isinstance(results[0], UserInactive)
    assert results[1] == "held"
    # A committed hold does not answer the next caller either: the slot may
    # have another seat (docs/seats.md), so it leads and, here, wins one.
    assert results[2] == "held"
    assert led == [0, 1, 1]
    assert not flights.in_flight(slot)


async def test_a_follower_gives_up_at_its_own_deadline_and_a_cancelled_leader_frees_the_rest() -> (
    None
):
    flights = SlotFlights()
    slot = uuid.uuid4()
    stuck = asyncio.Event()

    async def hangs(sending: Callable[[], None]) -> str:
        await stuck.wait()
        return "never"

    async def wins(sending: Callable[[], None]) -> str:
        return "held"

    leader = await _started(flights, slot, hangs)

    async def impatient() -> str:
        deadline.set_remaining(0.05)
        return await flights.hold(slot, wins)

    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(impatient(), 5)
    patient = await _started(flights, slot, wins)
    leader.cancel()
    assert await asyncio.wait_for(patient, 5) == "held"
    assert flights.waiting == 0 and not flights.in_flight(slot)
