"""Signed webhooks: every event, in order, signed (Standard Webhooks) with a
CloudEvents body, against a real receiver that verifies the signatures with
the `standardwebhooks` package; outages, slow receivers, 410, a run of
failures, two replicas, and a replica killed mid-delivery."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from booking.v1 import appointment_pb2 as apb
from booking.v1 import webhook_pb2 as wpb
from booking.v1 import webhook_pb2_grpc
from service.config import Config, ConfigError
from service.server import BookingServer
from storage import events as event_log
from storage import webhooks as webhook_store
from storage.database import Database
from storage.models import EventFilter, EventType, Position
from tests.support import Api, ServerConfig, expect_failure, hours_from_now, running_server
from tests.test_observability import scrape, total, value
from tests.webhook_receiver import Receiver, Request, new_secret, receiving

FAST = dict(
    webhook_poll_seconds=0.05,
    webhook_timeout_seconds=2.0,
    webhook_lease_seconds=6.0,
    webhook_backoff_max_seconds=0.1,
)


def _stub(api: Api) -> webhook_pb2_grpc.WebhookServiceAsyncStub:
    return webhook_pb2_grpc.WebhookServiceStub(api.channel)


async def _endpoint(
    api: Api, receiver: Receiver, path: str, *types: apb.AppointmentEventType.ValueType
) -> wpb.WebhookEndpoint:
    secret = new_secret()
    receiver.secrets[path] = [secret]
    reply = await _stub(api).CreateWebhookEndpoint(
        wpb.CreateWebhookEndpointRequest(url=receiver.url(path), event_types=types, secret=secret),
        metadata=api.md,
    )
    assert reply.secret == secret
    return reply.webhook_endpoint


async def _get(api: Api, endpoint_id: str) -> wpb.WebhookEndpoint:
    reply = await _stub(api).GetWebhookEndpoint(
        wpb.GetWebhookEndpointRequest(id=endpoint_id), metadata=api.md
    )
    return reply.webhook_endpoint


async def _until(api: Api, endpoint_id: str, ok: Any) -> wpb.WebhookEndpoint:
    """The endpoint once `ok(endpoint)` holds (its cursor moves after the
    receiver answered, so shortly after the receiver saw the request)."""
    for _ in range(600):
        endpoint = await _get(api, endpoint_id)
        if ok(endpoint):
            return endpoint
        await asyncio.sleep(0.05)
    raise AssertionError(f"endpoint never reached the state: {endpoint}")


async def _make_events(api: Api, count: int, *, first_hour: int = 24) -> None:
    """`count` holds, every third one confirmed and every fifth cancelled,
    from several concurrent callers."""
    specialist = await api.specialist()

    async def one(i: int) -> None:
        slot = await api.slot(specialist.id, hours_from_now(first_hour + i))
        held = await api.hold(slot.id, user_id=await api.user_id())
        if i % 3 == 0:
            await api.appointments.ConfirmAppointment(
                apb.ConfirmAppointmentRequest(id=held.id), metadata=api.md
            )
        if i % 5 == 0:
            await api.appointments.CancelAppointment(
                apb.CancelAppointmentRequest(id=held.id, reason="test"), metadata=api.md
            )

    await asyncio.gather(*(one(i) for i in range(count)))


async def _log(db: Database, types: frozenset[Any] = frozenset()) -> list[str]:
    """Every event id in log order (the order each endpoint must see)."""
    events, _, _ = await event_log.read_after(db, Position.start(), EventFilter(types=types), 10000)
    return [str(e.id) for e in events]


@pytest.fixture
async def hooks(database_url: str) -> AsyncIterator[tuple[BookingServer, Api, Receiver]]:
    async with receiving() as receiver:
        async with running_server(database_url, **FAST) as server:
            async with Api.connect(server) as api:
                yield server, api, receiver


async def test_every_event_arrives_signed_in_order_as_a_cloud_event(
    hooks: tuple[BookingServer, Api, Receiver],
) -> None:
    server, api, receiver = hooks
    assert server.db is not None
    everything = await _endpoint(api, receiver, "/all")
    await _endpoint(api, receiver, "/cancels", apb.APPOINTMENT_EVENT_TYPE_CANCELLED)
    await _make_events(api, 15)
    expected = await _log(server.db)
    cancels = [
        e for e in expected if e in set(await _log(server.db, frozenset({EventType.CANCELLED})))
    ]
    assert len(expected) > 15 and 0 < len(cancels) < len(expected)

    await receiver.wait(
        lambda: (
            len(receiver.first_arrivals("/all")) == len(expected)
            and len(receiver.first_arrivals("/cancels")) == len(cancels)
        )
    )
    assert receiver.first_arrivals("/all") == expected
    assert receiver.first_arrivals("/cancels") == cancels
    assert not receiver.unverified
    first = receiver.accepted("/all")[0]
    body = first.body
    assert body["specversion"] == "1.0" and body["id"] == first.msg_id == expected[0]
    assert body["source"] and body["type"] == "booking.appointment.held" and body["time"]
    assert body["data"]["id"] == first.msg_id and body["data"]["appointment"]["id"]
    assert first.headers["content-type"] == "application/cloudevents+json"
    await _until(api, everything.id, lambda e: e.delivered == len(expected))

    # Rotation: both secrets sign until the old one is retired.
    rotated = await _stub(api).RotateWebhookSecret(
        wpb.RotateWebhookSecretRequest(id=everything.id), metadata=api.md
    )
    receiver.secrets["/all"].append(rotated.secret)
    assert rotated.webhook_endpoint.secret_count == 2
    await _make_events(api, 1, first_hour=100)
    expected = await _log(server.db)
    await receiver.wait(lambda: len(receiver.first_arrivals("/all")) == len(expected))
    assert receiver.accepted("/all")[-1].verified == [0, 1]
    assert len(receiver.accepted("/all")[-1].headers["webhook-signature"].split(" ")) == 2

    # Retired: only the newest signs; the old secrets verify nothing more.
    newest = new_secret()
    await _stub(api).RotateWebhookSecret(
        wpb.RotateWebhookSecretRequest(id=everything.id, retire_previous=True, secret=newest),
        metadata=api.md,
    )
    receiver.secrets["/all"].append(newest)
    await _make_events(api, 1, first_hour=101)
    expected = await _log(server.db)
    await receiver.wait(lambda: len(receiver.first_arrivals("/all")) == len(expected))
    assert receiver.first_arrivals("/all") == expected
    assert receiver.accepted("/all")[-1].verified == [2]
    assert not receiver.unverified


async def test_a_receiver_outage_delays_but_loses_nothing(
    hooks: tuple[BookingServer, Api, Receiver],
) -> None:
    server, api, receiver = hooks
    assert server.db is not None
    down = asyncio.Event()
    down.set()

    async def flaky(request: Request, n: int) -> int:
        # Down (503, or the connection dropped) until the test says otherwise.
        if down.is_set():
            if n % 2:
                raise ConnectionError("dropped")
            return 503
        return 200

    receiver.behaviour["/flaky"] = flaky
    endpoint = await _endpoint(api, receiver, "/flaky")
    await _make_events(api, 8)
    expected = await _log(server.db)
    await receiver.wait(lambda: len(receiver.requests.get("/flaky", [])) >= 6)
    during = await _get(api, endpoint.id)
    assert during.enabled and during.failures >= 1 and during.last_error
    assert during.delivered == 0
    down.clear()
    await receiver.wait(lambda: len(receiver.first_arrivals("/flaky")) == len(expected))
    assert receiver.first_arrivals("/flaky") == expected
    after = await _until(api, endpoint.id, lambda e: e.delivered == len(expected))
    assert after.enabled and after.failures == 0
    # Every retry of one event carried the same webhook-id.
    ids = [r.msg_id for r in receiver.requests["/flaky"]]
    assert ids[: ids.count(expected[0])] == [expected[0]] * ids.count(expected[0])


async def test_a_slow_receiver_times_out_and_gets_the_event_again(
    database_url: str,
) -> None:
    async with receiving() as receiver:
        config = {**FAST, "webhook_timeout_seconds": 0.5, "webhook_lease_seconds": 3.0}
        async with running_server(database_url, **config) as server, Api.connect(server) as api:
            assert server.db is not None

            async def slow_first(request: Request, n: int) -> int:
                if n < 2:
                    await asyncio.sleep(2.0)  # past the delivery timeout
                return 200

            receiver.behaviour["/slow"] = slow_first
            endpoint = await _endpoint(api, receiver, "/slow")
            await _make_events(api, 4)
            expected = await _log(server.db)
            await receiver.wait(lambda: len(receiver.first_arrivals("/slow")) == len(expected))
            assert receiver.first_arrivals("/slow") == expected
            seen = [r.msg_id for r in receiver.requests["/slow"]]
            assert seen[:3] == [expected[0]] * 3  # timed out twice, then accepted
            # (The receiver still works on an abandoned request while the retry
            # arrives: the sender gave up on it, so in-flight counts here say nothing.)
            assert (await _get(api, endpoint.id)).last_error == "timeout"


async def test_410_and_a_run_of_failures_disable_an_endpoint(
    database_url: str,
) -> None:
    async with receiving() as receiver:
        config = {**FAST, "webhook_max_failures": 3}
        async with running_server(database_url, **config) as server, Api.connect(server) as api:

            async def gone(_: Request, __: int) -> int:
                return 410

            async def broken(_: Request, __: int) -> int:
                return 500

            receiver.behaviour["/gone"] = gone
            receiver.behaviour["/broken"] = broken
            gone_ep = await _endpoint(api, receiver, "/gone")
            broken_ep = await _endpoint(api, receiver, "/broken")
            await _make_events(api, 3)
            await receiver.wait(lambda: len(receiver.requests.get("/broken", [])) >= 3)
            gone_now = await _until(api, gone_ep.id, lambda e: not e.enabled)
            broken_now = await _until(api, broken_ep.id, lambda e: not e.enabled)
            assert not gone_now.enabled and gone_now.disabled_reason == "GONE"
            assert not broken_now.enabled and broken_now.disabled_reason == "FAILURES"
            assert broken_now.failures == 3 and broken_now.last_error == "HTTP 500"
            await asyncio.sleep(0.5)  # several polls: a disabled endpoint gets nothing
            assert len(receiver.requests["/gone"]) == 1
            assert len(receiver.requests["/broken"]) == 3

            # Enabled again, it resumes where it stopped.
            receiver.behaviour.pop("/broken")
            await _stub(api).EnableWebhookEndpoint(
                wpb.EnableWebhookEndpointRequest(id=broken_ep.id), metadata=api.md
            )
            assert server.db is not None
            expected = await _log(server.db)
            await receiver.wait(lambda: receiver.first_arrivals("/broken") == expected)


async def test_bad_requests_and_missing_endpoints(
    hooks: tuple[BookingServer, Api, Receiver],
) -> None:
    _, api, receiver = hooks
    stub = _stub(api)
    for bad in (
        wpb.CreateWebhookEndpointRequest(url="ftp://example.com/x"),
        wpb.CreateWebhookEndpointRequest(url="http://"),
        wpb.CreateWebhookEndpointRequest(url="http://[::1"),
        wpb.CreateWebhookEndpointRequest(url="http://x/\x00"),
        wpb.CreateWebhookEndpointRequest(url="http://x/" + "a" * 3000),
        wpb.CreateWebhookEndpointRequest(url=receiver.url("/x"), secret="whsec_short"),
        wpb.CreateWebhookEndpointRequest(url=receiver.url("/x"), secret="nope"),
        wpb.CreateWebhookEndpointRequest(url=receiver.url("/x"), event_types=[99]),  # type: ignore[list-item]
    ):
        async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT):
            await stub.CreateWebhookEndpoint(bad, metadata=api.md)
    missing = "00000000-0000-4000-8000-000000000000"
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "WEBHOOK_ENDPOINT_NOT_FOUND"):
        await stub.GetWebhookEndpoint(wpb.GetWebhookEndpointRequest(id=missing), metadata=api.md)
    async with expect_failure(grpc.StatusCode.NOT_FOUND, "WEBHOOK_ENDPOINT_NOT_FOUND"):
        await stub.DeleteWebhookEndpoint(
            wpb.DeleteWebhookEndpointRequest(id=missing), metadata=api.md
        )
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT):
        await stub.EnableWebhookEndpoint(wpb.EnableWebhookEndpointRequest(id="x"), metadata=api.md)
    made = await _endpoint(api, receiver, "/listed")
    listed = await stub.ListWebhookEndpoints(wpb.ListWebhookEndpointsRequest(), metadata=api.md)
    assert [e.id for e in listed.webhook_endpoints] == [made.id]
    await stub.DeleteWebhookEndpoint(wpb.DeleteWebhookEndpointRequest(id=made.id), metadata=api.md)
    listed = await stub.ListWebhookEndpoints(wpb.ListWebhookEndpointsRequest(), metadata=api.md)
    assert not listed.webhook_endpoints


async def _list(api: Api, **fields: Any) -> wpb.ListWebhookEndpointsResponse:
    return await _stub(api).ListWebhookEndpoints(
        wpb.ListWebhookEndpointsRequest(**fields), metadata=api.md
    )


async def _walk(api: Api, page_size: int, **filters: Any) -> list[str]:
    """Every endpoint id, page by page, checking each page's size."""
    ids: list[str] = []
    token = ""
    while True:
        page = await _list(api, page_size=page_size, page_token=token, **filters)
        assert len(page.webhook_endpoints) <= page_size
        ids += [e.id for e in page.webhook_endpoints]
        token = page.next_page_token
        if not token:
            return ids
        assert len(page.webhook_endpoints) == page_size


async def test_webhook_endpoints_are_listed_in_pages_with_an_enabled_filter(
    hooks: tuple[BookingServer, Api, Receiver],
) -> None:
    _, api, receiver = hooks

    async def gone(_: Request, __: int) -> int:
        return 410

    made = []
    for i in range(5):
        if i in (1, 3):
            receiver.behaviour[f"/paged/{i}"] = gone
        made.append((await _endpoint(api, receiver, f"/paged/{i}")).id)
    await _make_events(api, 1)
    for i in (1, 3):
        await _until(api, made[i], lambda e: not e.enabled)
    for size in (1, 2, 3, 5, 6):
        assert await _walk(api, size) == made, f"page_size={size}"
    assert await _walk(api, 1, enabled=True) == [made[0], made[2], made[4]]
    assert await _walk(api, 2, enabled=False) == [made[1], made[3]]
    # 0 means the default (50): everything in one page.
    everything = await _list(api, page_size=0)
    assert [e.id for e in everything.webhook_endpoints] == made
    assert everything.next_page_token == ""
    async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT) as box:
        await _list(api, page_size=-1)
    assert box[0].violations == ["page_size"]
    # A token is a position, not an offset: deleting an endpoint of the page
    # already read skips nothing on the next.
    first = await _list(api, page_size=2)
    await _stub(api).DeleteWebhookEndpoint(
        wpb.DeleteWebhookEndpointRequest(id=made[1]), metadata=api.md
    )
    second = await _list(api, page_size=2, page_token=first.next_page_token)
    assert [e.id for e in second.webhook_endpoints] == made[2:4]


async def test_webhook_page_tokens_are_bound_to_their_filters(
    hooks: tuple[BookingServer, Api, Receiver],
) -> None:
    _, api, receiver = hooks
    for i in range(3):
        await _endpoint(api, receiver, f"/tokens/{i}")
    unfiltered = (await _list(api, page_size=1)).next_page_token
    enabled = (await _list(api, page_size=1, enabled=True)).next_page_token
    assert unfiltered and enabled
    for token, filters in [
        (unfiltered, {"enabled": True}),
        (unfiltered, {"enabled": False}),
        (enabled, {}),
        (enabled, {"enabled": False}),
        ("not-a-token", {}),
        # base64 of an offset is not a token either.
        ("MQ", {}),
    ]:
        async with expect_failure(grpc.StatusCode.INVALID_ARGUMENT) as box:
            await _list(api, page_size=1, page_token=token, **filters)
        assert box[0].violations == ["page_token"], (token, filters)
    again = await _list(api, page_size=1, page_token=enabled, enabled=True)
    assert len(again.webhook_endpoints) == 1


async def test_webhook_page_size_above_1000_is_coerced_to_1000(database_url: str) -> None:
    # No dispatcher: 1001 endpoints nobody delivers to.
    async with running_server(database_url, webhooks=False) as server, Api.connect(server) as api:
        stub = _stub(api)

        async def one(i: int) -> None:
            await stub.CreateWebhookEndpoint(
                wpb.CreateWebhookEndpointRequest(url=f"http://127.0.0.1:9/coerced/{i}"),
                metadata=api.md,
            )

        for start in range(0, 1001, 50):
            await asyncio.gather(*(one(i) for i in range(start, min(start + 50, 1001))))
        page = await _list(api, page_size=5000)
        assert len(page.webhook_endpoints) == 1000
        assert page.next_page_token
        rest = await _list(api, page_size=5000, page_token=page.next_page_token)
        assert len(rest.webhook_endpoints) == 1 and rest.next_page_token == ""
        seen = {e.id for e in page.webhook_endpoints} | {e.id for e in rest.webhook_endpoints}
        assert len(seen) == 1001


async def test_two_replicas_never_deliver_to_one_endpoint_at_once(database_url: str) -> None:
    async with receiving() as receiver:

        async def slowish(_: Request, __: int) -> int:
            await asyncio.sleep(0.02)
            return 200

        async with (
            running_server(database_url, **FAST) as one,
            running_server(database_url, **FAST) as two,
            Api.connect(one) as api,
        ):
            assert one.db is not None and one.dispatcher and two.dispatcher
            paths = [f"/replicas/{i}" for i in range(4)]
            for path in paths:
                receiver.behaviour[path] = slowish
                await _endpoint(api, receiver, path)
            await _make_events(api, 12)
            expected = await _log(one.db)
            await receiver.wait(
                lambda: all(len(receiver.first_arrivals(p)) == len(expected) for p in paths)
            )
            for path in paths:
                assert receiver.first_arrivals(path) == expected
                assert receiver.max_inflight[path] == 1
                # No failure, no lease lost: exactly once.
                assert len(receiver.requests[path]) == len(expected)


def _serve(database_url: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-migrate-on-start",
            "--sweep-interval-seconds",
            "3600",
            *extra,
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_a_replica_killed_mid_delivery_loses_nothing(database_url: str) -> None:
    """A server process holds the endpoint and is SIGKILLed while its request
    is at the receiver; another replica takes over once the lease expires and
    delivers from the last acknowledged event: nothing missing, nothing out
    of order, and the interrupted event sent again with the same id."""
    lease = 4.0
    async with receiving() as receiver:
        held = asyncio.Event()
        resume = asyncio.Event()

        async def hold_the_fifth(request: Request, n: int) -> int:
            if n == 4:
                held.set()
                await resume.wait()
            return 200

        receiver.behaviour["/kill"] = hold_the_fifth
        async with running_server(database_url, webhooks=False) as quiet, Api.connect(quiet) as api:
            assert quiet.db is not None
            await _endpoint(api, receiver, "/kill")
            await _make_events(api, 10)
            victim = _serve(
                database_url,
                "--webhook-poll-seconds",
                "0.05",
                "--webhook-timeout-seconds",
                "1",
                "--webhook-lease-seconds",
                str(lease),
            )
            try:
                await asyncio.wait_for(held.wait(), 60)
                victim.send_signal(signal.SIGKILL)
                await asyncio.to_thread(victim.wait, 30)
            finally:
                if victim.poll() is None:
                    victim.kill()
                    victim.wait(30)
            resume.set()
            interrupted = receiver.requests["/kill"][4].msg_id
            await _make_events(api, 5, first_hour=200)
            expected = await _log(quiet.db)
            async with running_server(
                database_url,
                **{**FAST, "webhook_timeout_seconds": 1.0, "webhook_lease_seconds": lease},
            ):
                await receiver.wait(lambda: len(receiver.first_arrivals("/kill")) == len(expected))
        assert receiver.first_arrivals("/kill") == expected
        ids = [r.msg_id for r in receiver.requests["/kill"]]
        assert ids.count(interrupted) == 2 and ids[:4] == expected[:4]
        assert ids[4:6] == [interrupted, interrupted]
        assert receiver.max_inflight["/kill"] == 1
        assert not receiver.unverified


async def test_webhook_metrics_show_failures_lag_and_backlog(database_url: str) -> None:
    async with receiving() as receiver:
        down = asyncio.Event()
        down.set()

        async def outage(_: Request, __: int) -> int:
            return 503 if down.is_set() else 200

        receiver.behaviour["/metrics"] = outage
        async with (
            running_server(database_url, metrics_port=0, **FAST) as server,
            Api.connect(server) as api,
        ):
            assert server.db is not None
            await _endpoint(api, receiver, "/metrics")
            await _make_events(api, 2)
            await receiver.wait(lambda: len(receiver.requests.get("/metrics", [])) >= 4)
            # The receiver records a request before the dispatcher reads its
            # answer: after the 4th arrived, the 3rd failure is counted.
            during = await scrape(server)
            assert value(during, "booking_webhooks_failures_total", reason="http_5xx") >= 3
            assert total(during, "booking_webhooks_backlog_age_seconds") > 0
            down.clear()
            expected = await _log(server.db)
            await receiver.wait(lambda: len(receiver.first_arrivals("/metrics")) == len(expected))
            for _ in range(600):
                after = await scrape(server)
                if total(after, "booking_webhooks_deliveries_total") == len(expected):
                    break
                await asyncio.sleep(0.05)
            assert total(after, "booking_webhooks_deliveries_total") == len(expected)
            assert total(after, "booking_webhooks_delivery_lag_seconds_count") == len(expected)
            for _ in range(600):
                if total(await scrape(server), "booking_webhooks_backlog_age_seconds") == 0:
                    break
                await asyncio.sleep(0.05)
            assert total(await scrape(server), "booking_webhooks_backlog_age_seconds") == 0


async def test_one_server_serves_at_most_concurrency_endpoints_at_once(database_url: str) -> None:
    async with receiving() as receiver:

        async def slow(_: Request, __: int) -> int:
            await asyncio.sleep(0.05)
            return 200

        config = {**FAST, "webhook_concurrency": 2}
        async with running_server(database_url, **config) as server, Api.connect(server) as api:
            assert server.db is not None
            paths = [f"/bounded/{i}" for i in range(5)]
            for path in paths:
                receiver.behaviour[path] = slow
                await _endpoint(api, receiver, path)
            await _make_events(api, 4)
            expected = await _log(server.db)
            await receiver.wait(lambda: all(receiver.first_arrivals(p) == expected for p in paths))
            assert receiver.max_total_inflight == 2


def test_webhook_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="webhook_lease_seconds"):
        Config(webhook_timeout_seconds=10, webhook_lease_seconds=15).validate()
    with pytest.raises(ConfigError, match="webhook_concurrency"):
        Config(webhook_concurrency=0).validate()
    with pytest.raises(ConfigError, match="calendar_feed_port"):
        Config(calendar_feed_port=70000).validate()
    assert Config().calendar_feed_port is None and Config().webhooks


async def test_retries_back_off_exponentially_with_jitter(
    hooks: tuple[BookingServer, Api, Receiver],
) -> None:
    """store.fail as the dispatcher calls it: the wait after the n-th failure
    in a row is min(max, base * 2^(n-1)) times a random factor in [0.5, 1)."""
    server, api, receiver = hooks
    db = server.db
    assert db is not None
    # Not deliverable by the server's own dispatcher: disabled below at once.
    made = await _endpoint(api, receiver, "/backoff")
    endpoint_id = uuid.UUID(made.id)
    conn = await asyncpg.connect(db.dsn)
    try:
        waits = []
        for n in range(1, 9):
            await conn.execute(
                "UPDATE webhook_endpoints SET lease_owner = 'test', next_attempt_at = now(),"
                " lease_expires_at = now() + interval '1 hour' WHERE id = $1",
                endpoint_id,
            )
            enabled, failures = await webhook_store.fail(
                db,
                endpoint_id,
                "test",
                error="HTTP 500",
                gone=False,
                max_failures=8,
                backoff_base=1.0,
                backoff_max=30.0,
            )
            assert failures == n and enabled == (n < 8)
            wait = await conn.fetchval(
                "SELECT extract(epoch FROM next_attempt_at - updated_at)::float8"
                " FROM webhook_endpoints WHERE id = $1",
                endpoint_id,
            )
            waits.append(wait)
            ceiling = min(30.0, 2.0 ** (n - 1))
            assert 0.5 * ceiling <= wait < ceiling, (n, wait)
        assert len(set(waits)) == len(waits)  # jittered, not a fixed schedule
    finally:
        await conn.close()


async def test_a_stopping_replica_gives_its_endpoints_up(database_url: str) -> None:
    """SIGTERM's path: the request in flight is abandoned, the lease released
    at once (not left to expire), and the next replica resends that event."""
    async with receiving() as receiver:
        held = asyncio.Event()
        resume = asyncio.Event()

        async def hold_the_third(_: Request, n: int) -> int:
            if n == 2:
                held.set()
                await resume.wait()
            return 200

        receiver.behaviour["/stop"] = hold_the_third
        async with running_server(database_url, webhooks=False) as quiet, Api.connect(quiet) as api:
            assert quiet.db is not None
            endpoint = await _endpoint(api, receiver, "/stop")
            await _make_events(api, 4)
            expected = await _log(quiet.db)
            first = BookingServer(ServerConfig.for_tests(database_url, **FAST))
            await first.start()
            try:
                await asyncio.wait_for(held.wait(), 60)
                await first.stop(grace=0.5)
            finally:
                await first.stop()
                resume.set()
            conn = await asyncpg.connect(quiet.db.dsn)
            try:
                lease = await conn.fetchrow(
                    "SELECT lease_owner, delivered FROM webhook_endpoints WHERE id = $1",
                    uuid.UUID(endpoint.id),
                )
            finally:
                await conn.close()
            assert lease["lease_owner"] is None and lease["delivered"] == 2
            async with running_server(database_url, **FAST):
                await receiver.wait(lambda: receiver.first_arrivals("/stop") == expected)
        ids = [r.msg_id for r in receiver.requests["/stop"]]
        assert ids[:4] == [expected[0], expected[1], expected[2], expected[2]]


@pytest.mark.parametrize("history", ["empty log", "earlier events"])
async def test_events_pruned_before_delivery_disable_the_endpoint(
    database_url: str, history: str
) -> None:
    """Retention pruned events the endpoint never got: it is disabled
    (COMPACTED) rather than silently skipping them, whether its cursor is
    the start of the log or an event position."""
    async with receiving() as receiver:
        down = asyncio.Event()
        down.set()

        async def outage(_: Request, __: int) -> int:
            return 503 if down.is_set() else 200

        receiver.behaviour["/pruned"] = outage
        config = {**FAST, "webhook_max_failures": 100000}
        async with running_server(database_url, **config) as server, Api.connect(server) as api:
            assert server.db is not None
            if history == "earlier events":
                await _make_events(api, 2, first_hour=300)
            endpoint = await _endpoint(api, receiver, "/pruned")
            await _make_events(api, 3)
            await receiver.wait(lambda: len(receiver.requests.get("/pruned", [])) >= 2)
            conn = await asyncpg.connect(server.db.dsn)
            try:
                # Pruning stops at the stable horizon, which a statement still
                # running anywhere in the cluster holds back: prune until all
                # the endpoint's events are gone.
                for _ in range(600):
                    await conn.fetchval("SELECT booking_prune_events('0 seconds', 10000)")
                    if not await conn.fetchval("SELECT count(*) FROM appointment_events"):
                        break
                    await asyncio.sleep(0.05)
                assert not await conn.fetchval("SELECT count(*) FROM appointment_events")
            finally:
                await conn.close()
            down.clear()
            disabled = await _until(api, endpoint.id, lambda e: not e.enabled)
            assert disabled.disabled_reason == "COMPACTED"
            assert not receiver.accepted("/pruned")

            # A new endpoint after pruning starts at the horizon and works.
            fresh = await _endpoint(api, receiver, "/after-pruning")
            await _make_events(api, 1, first_hour=400)
            await receiver.wait(lambda: len(receiver.accepted("/after-pruning")) >= 1)
            assert (await _get(api, fresh.id)).enabled
