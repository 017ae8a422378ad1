"""Calendar feeds: an RFC 5545 feed per user or specialist, served over HTTP
with a secret token; parsed here with a real iCalendar parser (icalendar)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import cast

import grpc
import httpx
import icalendar
import pytest

from booking.v1 import appointment_pb2 as apb
from booking.v1 import calendar_pb2 as cpb
from booking.v1 import calendar_pb2_grpc
from service import calendar_feed, ical
from service.server import BookingServer
from storage.feeds import Feed, FeedEntry, Subject
from storage.models import AppointmentStatus
from tests.support import Api, expect_failure, hours_from_now, running_server


@pytest.fixture
async def feed_server(database_url: str) -> AsyncIterator[BookingServer]:
    async with running_server(database_url, calendar_feed_port=0, webhooks=False) as server:
        yield server


@pytest.fixture
async def fapi(feed_server: BookingServer) -> AsyncIterator[Api]:
    async with Api.connect(feed_server) as api:
        yield api


def _stub(api: Api) -> calendar_pb2_grpc.CalendarFeedServiceAsyncStub:
    return calendar_pb2_grpc.CalendarFeedServiceStub(api.channel)


async def _rotate(api: Api, **subject: str) -> str:
    reply = await _stub(api).RotateCalendarFeedToken(
        cpb.RotateCalendarFeedTokenRequest(**subject), metadata=api.md
    )
    assert reply.path == f"/calendar/{reply.token}.ics"
    return reply.path


async def _get(server: BookingServer, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.calendar_feed_port}") as c:
        return await c.get(path)


def _events(body: bytes) -> dict[str, icalendar.Event]:
    calendar = icalendar.Calendar.from_ical(body)
    assert calendar["VERSION"] == "2.0" and calendar["PRODID"]
    return {str(e["UID"]): cast(icalendar.Event, e) for e in calendar.walk("VEVENT")}


def _uid(appointment_id: str) -> str:
    return f"{appointment_id}@{ical.UID_DOMAIN}"


async def _confirmed(api: Api, specialist_id: str, user_id: str, hours: float) -> str:
    slot = await api.slot(specialist_id, hours_from_now(hours))
    held = await api.hold(slot.id, user_id=user_id)
    await api.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=held.id), metadata=api.md
    )
    return held.id


async def test_a_users_feed_follows_reschedules_and_cancellations(
    feed_server: BookingServer, fapi: Api
) -> None:
    client, user_id = await fapi.client()
    specialist = await fapi.specialist(name="Dr. Semi; Colon, Comma")
    kept = await _confirmed(fapi, specialist.id, user_id, 30)
    moved = await _confirmed(fapi, specialist.id, user_id, 32)
    cancelled = await _confirmed(fapi, specialist.id, user_id, 34)
    path = await _rotate(client)

    first = await _get(feed_server, path)
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("text/calendar")
    before = _events(first.content)
    assert set(before) == {_uid(kept), _uid(moved), _uid(cancelled)}
    assert all(int(str(e["SEQUENCE"])) == 0 for e in before.values())
    assert all(str(e["STATUS"]) == "CONFIRMED" for e in before.values())
    assert str(before[_uid(kept)]["SUMMARY"]) == "Appointment with Dr. Semi; Colon, Comma"

    new_start = hours_from_now(40).replace(microsecond=0)
    new_slot = await fapi.slot(specialist.id, new_start)
    await fapi.appointments.RescheduleAppointment(
        apb.RescheduleAppointmentRequest(id=moved, new_slot_id=new_slot.id), metadata=fapi.md
    )
    await fapi.appointments.CancelAppointment(
        apb.CancelAppointmentRequest(id=cancelled, reason="ill"), metadata=fapi.md
    )

    after = _events((await _get(feed_server, path)).content)
    # Same UIDs: a calendar app updates its events instead of adding new ones.
    assert set(after) == set(before)
    assert int(str(after[_uid(kept)]["SEQUENCE"])) == 0
    assert int(str(after[_uid(moved)]["SEQUENCE"])) == 1
    assert after[_uid(moved)].decoded("DTSTART") == new_start.astimezone(UTC)
    assert after[_uid(moved)].decoded("DTEND") == new_start + timedelta(minutes=30)
    assert str(after[_uid(moved)]["STATUS"]) == "CONFIRMED"
    assert int(str(after[_uid(cancelled)]["SEQUENCE"])) == 1
    assert str(after[_uid(cancelled)]["STATUS"]) == "CANCELLED"

    # Moving it again bumps it again.
    await fapi.appointments.RescheduleAppointment(
        apb.RescheduleAppointmentRequest(
            id=moved, new_slot_id=(await fapi.slot(specialist.id, hours_from_now(44))).id
        ),
        metadata=fapi.md,
    )
    again = _events((await _get(feed_server, path)).content)
    assert int(str(again[_uid(moved)]["SEQUENCE"])) == 2


async def test_rotation_and_revocation_kill_the_old_url(
    feed_server: BookingServer, fapi: Api
) -> None:
    client, user_id = await fapi.client()
    first = await _rotate(client)
    assert (await _get(feed_server, first)).status_code == 200
    second = await _rotate(client)
    assert second != first
    assert (await _get(feed_server, first)).status_code == 404
    assert (await _get(feed_server, second)).status_code == 200

    await _stub(client).RevokeCalendarFeedToken(
        cpb.RevokeCalendarFeedTokenRequest(), metadata=client.md
    )
    revoked = await _get(feed_server, second)
    assert revoked.status_code == 404
    assert b"VCALENDAR" not in revoked.content
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "CALENDAR_FEED_NOT_FOUND"):
        await _stub(client).RevokeCalendarFeedToken(
            cpb.RevokeCalendarFeedTokenRequest(), metadata=client.md
        )


async def test_a_feed_shows_only_its_owners_appointments(
    feed_server: BookingServer, fapi: Api
) -> None:
    alice, alice_id = await fapi.client()
    bob, bob_id = await fapi.client()
    specialist = await fapi.specialist()
    other_specialist = await fapi.specialist(name="Dr. Elsewhere")
    alices = await _confirmed(fapi, specialist.id, alice_id, 30)
    bobs = await _confirmed(fapi, specialist.id, bob_id, 31)
    elsewhere = await _confirmed(fapi, other_specialist.id, bob_id, 33)

    bob_feed = _events((await _get(feed_server, await _rotate(bob))).content)
    assert set(bob_feed) == {_uid(bobs), _uid(elsewhere)}
    alice_body = (await _get(feed_server, await _rotate(alice))).content
    assert set(_events(alice_body)) == {_uid(alices)}
    assert bobs.encode() not in alice_body and bob_id.encode() not in alice_body

    # A CLIENT manages only its own feed, and no specialist's.
    async with expect_failure(grpc.StatusCode.PERMISSION_DENIED):
        await _rotate(alice, user_id=bob_id)
    async with expect_failure(grpc.StatusCode.PERMISSION_DENIED):
        await _rotate(alice, specialist_id=specialist.id)
    async with expect_failure(grpc.StatusCode.PERMISSION_DENIED):
        await _stub(alice).RevokeCalendarFeedToken(
            cpb.RevokeCalendarFeedTokenRequest(user_id=bob_id), metadata=alice.md
        )

    # A specialist's feed (made by staff) lists its appointments and names no client.
    body = (await _get(feed_server, await _rotate(fapi, specialist_id=specialist.id))).content
    assert set(_events(body)) == {_uid(alices), _uid(bobs)}
    for secret in (alice_id, bob_id, b"@example.com".decode()):
        assert secret.encode() not in body
    calendar = icalendar.Calendar.from_ical(body)
    assert str(calendar["X-WR-TIMEZONE"]) == "UTC"

    async with expect_failure(grpc.StatusCode.NOT_FOUND, "SPECIALIST_NOT_FOUND"):
        await _rotate(fapi, specialist_id="00000000-0000-4000-8000-000000000000")


async def _raw(server: BookingServer, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.calendar_feed_port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split(b" ")[1]), rest


async def test_malformed_requests_get_400_or_404_and_no_internals(
    feed_server: BookingServer,
) -> None:
    token = "A" * 43
    cases = {
        f"GET /calendar/{token}.ics HTTP/1.1\r\n\r\n": 404,  # well formed, unknown
        f"GET /calendar/{token}.ics?x=1 HTTP/1.1\r\n\r\n": 404,
        f"HEAD /calendar/{token}.ics HTTP/1.1\r\n\r\n": 404,
        "GET /calendar/short.ics HTTP/1.1\r\n\r\n": 400,
        f"GET /calendar/{token[:-1]}%.ics HTTP/1.1\r\n\r\n": 400,
        f"GET /calendar/{token}.txt HTTP/1.1\r\n\r\n": 400,
        "GET /calendar/../../etc/passwd HTTP/1.1\r\n\r\n": 400,
        "GET /calendar/ HTTP/1.1\r\n\r\n": 400,
        "GET / HTTP/1.1\r\n\r\n": 404,
        "GET /metrics HTTP/1.1\r\n\r\n": 404,
        f"POST /calendar/{token}.ics HTTP/1.1\r\nContent-Length: 0\r\n\r\n": 405,
        "GARBAGE\r\n\r\n": 400,
        "GET /x HTTP/2.0\r\n\r\n": 400,
        "\x00\xff\xfe HTTP/1.1\r\n\r\n": 400,
        "GET /x HTTP/1.1\r\nX-Long: " + "a" * 20000 + "\r\n\r\n": 431,
        "GET /" + "a" * 20000 + " HTTP/1.1\r\n\r\n": 431,
    }
    for request, expected in cases.items():
        status, rest = await _raw(feed_server, request.encode("latin-1"))
        assert status == expected, (request[:60], status, rest[:200])
        assert b"Traceback" not in rest and b"Error" not in rest
    # Still serving after all that.
    assert (await _get(feed_server, f"/calendar/{token}.ics")).status_code == 404


async def test_the_feed_port_is_off_by_default(server: BookingServer) -> None:
    assert server.calendar_feed_port is None


def test_long_and_unusual_text_folds_and_parses_back() -> None:
    name = "Dr. Ünïcødé, \\backslash; " + "é" * 80 + "\nsecond line"
    now = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
    entry = FeedEntry(
        appointment_id=uuid.uuid4(),
        status=AppointmentStatus.HOLD,
        start_time=now,
        end_time=now + timedelta(minutes=45),
        created_at=now,
        updated_at=now,
        sequence=3,
        specialist_id=uuid.uuid4(),
        specialist_name=name,
        time_zone="Europe/Berlin",
    )
    body = ical.render(Feed(Subject(user_id=entry.specialist_id), None, None, [entry]), now)
    assert all(len(line) <= 75 for line in body.split(b"\r\n"))
    assert body.endswith(b"END:VCALENDAR\r\n")
    event = next(iter(_events(body).values()))
    assert str(event["SUMMARY"]) == f"Appointment with {name}"
    assert str(event["STATUS"]) == "TENTATIVE"
    assert int(str(event["SEQUENCE"])) == 3
    assert event.decoded("DTSTART") == now


async def test_a_database_outage_answers_503_without_internals() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"postgresql://nobody@127.0.0.1:{sock.getsockname()[1]}/nothing"
    async with running_server(dead, calendar_feed_port=0, webhooks=False) as server:
        reply = await _get(server, f"/calendar/{'B' * 43}.ics")
        assert reply.status_code == 503
        assert b"Traceback" not in reply.content and b"Error" not in reply.content
        assert reply.content == b"database unavailable, try again later\n"


async def test_idle_connections_are_bounded(
    feed_server: BookingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calendar_feed, "MAX_CONNECTIONS", 3)
    idle = [
        await asyncio.open_connection("127.0.0.1", feed_server.calendar_feed_port) for _ in range(3)
    ]
    try:
        for _, writer in idle:
            writer.write(b"GET /cal")  # never finished
            await writer.drain()
        for _ in range(500):
            status, rest = await _raw(feed_server, b"GET / HTTP/1.1\r\n\r\n")
            if status == 503:
                break
            await asyncio.sleep(0.02)
        assert status == 503 and b"busy" in rest
    finally:
        for _, writer in idle:
            writer.close()
    for _ in range(500):
        status, _ = await _raw(feed_server, b"GET / HTTP/1.1\r\n\r\n")
        if status == 404:
            break
        await asyncio.sleep(0.02)
    assert status == 404
