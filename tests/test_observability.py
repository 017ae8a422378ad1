"""Metrics scraped over real HTTP, traces from real calls, request ids in
logs and error details, and JSON-only logs from a real `serve --log-json`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from booking.v1 import appointment_pb2 as apb
from booking.v1 import auth_pb2
from service import request_context, telemetry
from service.server import BookingServer
from storage.database import Intent
from tests.support import Api, expect_failure, hours_from_now, running_server

ROOT = Path(__file__).resolve().parent.parent
HOLD = "booking.v1.AppointmentService/HoldSlot"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape_sync(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset(
                (k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope")
            )
            samples[(sample.name, labels)] = sample.value
    return samples


async def scrape(server: BookingServer) -> Samples:
    assert server.metrics_port is not None
    return await asyncio.to_thread(_scrape_sync, server.metrics_port)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with these labels (0 if absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def _bookable_slot(api: Api) -> str:
    specialist = await api.specialist()
    return (await api.slot(specialist.id, hours_from_now(48))).id


async def test_metrics_move_with_real_calls(database_url: str) -> None:
    async with running_server(database_url, metrics_port=0) as server, Api.connect(server) as api:
        slot_id = await _bookable_slot(api)
        client, _ = await api.client()
        stream = api.appointments.WatchAppointmentEvents(
            apb.WatchAppointmentEventsRequest(
                start_position=apb.WATCH_START_POSITION_NOW,
            ),
            metadata=api.md,
        )
        first = cast(apb.WatchAppointmentEventsResponse, await stream.read())
        # The opening heartbeat: the stream is open.
        assert first.HasField("heartbeat")
        before = await scrape(server)

        await client.hold(slot_id)
        async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION) as box:
            await api.hold(slot_id)
        refused = box[0].reason
        while True:
            message = cast(apb.WatchAppointmentEventsResponse, await stream.read())
            if message.HasField("event"):
                break

        # A conflict retried by Database.run is counted through its hook.
        assert server.db is not None
        conflicts = iter([asyncpg.SerializationError("conflict"), None])

        async def work(conn: Any) -> int:
            exc = next(conflicts)
            if exc is not None:
                raise exc
            return int(await conn.fetchval("SELECT 1"))

        assert await server.db.run(work, intent=Intent.READ) == 1
        after = await scrape(server)
        stream.cancel()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("booking_transitions_total", transition="hold", outcome="OK") == 1
    assert moved("booking_transitions_total", transition="hold", outcome=refused) == 1
    assert moved("grpc_server_call_started_total", grpc_method=HOLD) == 2
    assert moved("grpc_server_call_duration_seconds_count", grpc_method=HOLD, grpc_status="OK") == 1
    assert (
        moved(
            "grpc_server_call_duration_seconds_count",
            grpc_method=HOLD,
            grpc_status="FAILED_PRECONDITION",
        )
        == 1
    )
    assert moved("booking_db_retries_total", cause="SerializationError") == 1
    assert total(after, "booking_events_delivery_lag_seconds_count") >= 1
    assert value(after, "booking_streams_open") == 1
    assert value(after, "booking_database_up") == 1
    assert value(after, "booking_db_pool_size") >= 1
    assert ("booking_db_pool_in_use", frozenset()) in after
    assert ("booking_db_pool_waiting", frozenset()) in after


async def test_sweeper_releases_are_counted(database_url: str) -> None:
    async with (
        running_server(
            database_url, metrics_port=0, hold_ttl_seconds=0.5, sweep_interval_seconds=0.1
        ) as server,
        Api.connect(server) as api,
    ):
        slot_id = await _bookable_slot(api)
        await api.hold(slot_id, user_id=(await api.client())[1])
        deadline = time.monotonic() + 20
        while total(await scrape(server), "booking_sweeper_released_total") < 1:
            assert time.monotonic() < deadline, "the lapsed hold was not counted"
            await asyncio.sleep(0.1)


async def test_metrics_endpoint_is_off_by_default(server: BookingServer) -> None:
    assert server.metrics_port is None
    assert not telemetry.metrics().enabled


@contextmanager
def traced() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use_tracer_provider(provider)
    try:
        yield exporter
    finally:
        telemetry.use_tracer_provider(None)
        provider.shutdown()


async def test_hold_is_traced_under_the_callers_traceparent(database_url: str) -> None:
    trace_id = uuid.uuid4().hex
    parent_span = uuid.uuid4().hex[:16]
    traceparent = f"00-{trace_id}-{parent_span}-01"
    with traced() as exporter:
        async with running_server(database_url) as server, Api.connect(server) as api:
            slot_id = await _bookable_slot(api)
            md = [*api.md, ("traceparent", traceparent)]
            await api.appointments.HoldSlot(apb.HoldSlotRequest(slot_id=slot_id), metadata=md)
            async with expect_failure(grpc.StatusCode.FAILED_PRECONDITION) as box:
                await api.appointments.HoldSlot(apb.HoldSlotRequest(slot_id=slot_id), metadata=md)
        spans = exporter.get_finished_spans()

    assert box[0].call_ids["trace_id"] == trace_id
    holds = [s for s in spans if s.name == HOLD]
    assert len(holds) == 2
    for span in holds:
        assert span.context is not None and span.parent is not None
        assert format(span.context.trace_id, "032x") == trace_id
        assert format(span.parent.span_id, "016x") == parent_span
        assert span.parent.is_remote
        children = [
            s for s in spans if s.parent is not None and s.parent.span_id == span.context.span_id
        ]
        assert children, "no database span under the HoldSlot span"
        assert all(c.name.startswith("postgresql ") for c in children)
        assert all(
            c.attributes and c.attributes["db.system.name"] == "postgresql" for c in children
        )
    assert holds[0].attributes and holds[0].attributes["rpc.grpc.status_code"] == "OK"
    assert (
        holds[1].attributes and holds[1].attributes["rpc.grpc.status_code"] == "FAILED_PRECONDITION"
    )
    # Database work outside calls (the sweeper ran at start-up) is not traced.
    assert all(s.parent is not None for s in spans if s.name.startswith("postgresql "))
    # Calls without a traceparent start traces of their own.
    others = [s for s in spans if s.kind.name == "SERVER" and s.name != HOLD]
    assert others and all(
        s.context is not None and format(s.context.trace_id, "032x") != trace_id for s in others
    )


async def test_tracing_is_off_by_default(api: Api) -> None:
    assert telemetry.tracer() is None
    assert telemetry.tracing_from_env({}) is None


def test_tracing_follows_the_standard_otel_variables() -> None:
    assert telemetry.tracing_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert (
        telemetry.tracing_from_env(
            {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
        )
        is None
    )
    # An endpoint alone means OTLP (http/protobuf); nothing is sent until a span ends.
    remove = telemetry.tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert remove is not None and telemetry.tracer() is not None
    remove()
    assert telemetry.tracer() is None
    with pytest.raises(RuntimeError, match="not supported"):
        telemetry.tracing_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert telemetry.tracer() is None


async def test_request_id_in_log_lines_error_details_and_response(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(request_context.RequestIdFilter())
    caplog.set_level(logging.INFO, logger="booking.rpc")
    missing = str(uuid.uuid4())
    call = api.appointments.GetAppointment(
        apb.GetAppointmentRequest(id=missing),
        metadata=[*api.md, ("x-request-id", "req-abc-123")],
    )
    async with expect_failure(grpc.StatusCode.NOT_FOUND) as box:
        await call
    assert box[0].call_ids["x_request_id"] == "req-abc-123"
    assert ("x-request-id", "req-abc-123") in list(await call.trailing_metadata() or ())
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "req-abc-123"]
    assert lines and "GetAppointment NOT_FOUND" in lines[0].getMessage()

    # Without one, a fresh id: in the response and in the log line.
    caplog.clear()
    ok = api.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=api.md)
    await ok
    sent = dict(list(await ok.trailing_metadata() or ()))["x-request-id"]
    assert uuid.UUID(sent).version == 4 and uuid.UUID(sent).variant == uuid.RFC_4122
    assert [r for r in caplog.records if getattr(r, "request_id", None) == sent]


def _json_lines(raw: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in raw:
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return out


@pytest.fixture
async def empty_database_url(pg_admin_url: str) -> AsyncIterator[str]:
    """A database without the schema: the server's first start migrates it."""
    name = f"booking_empty_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    yield urlunsplit(urlsplit(pg_admin_url)._replace(path="/" + name))
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def test_json_mode_logs_only_json(empty_database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": empty_database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *["-m", "service.cli", "serve", "--log-json", "--port", "0", "--host", "127.0.0.1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    raw: list[str] = []
    try:
        port = 0
        while not port:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, "server exited before listening:\n" + "".join(raw)
            raw.append(line)
            record = _json_lines([line])[0]
            if "listening on" in record["message"]:
                port = record["port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            api = Api(channel, cast(BookingServer, None))
            with pytest.raises(grpc.aio.AioRpcError):
                await api.auth.Login(
                    auth_pb2.LoginRequest(email="nobody@example.com", password="x" * 12),
                    metadata=[("x-request-id", "json-req-1")],
                )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 60)
    raw.extend(rest.decode().splitlines())
    records = _json_lines([line for line in raw if line.strip()])
    assert proc.returncode == 0
    # The migrations applied on this first start are summed up in one line.
    assert not [r for r in records if r["logger"].startswith("yoyo")]
    assert [r for r in records if r["message"].startswith("applied migrations")]
    login = [r for r in records if r.get("rpc_method") == "/booking.v1.AuthService/Login"]
    assert login and login[0]["request_id"] == "json-req-1"


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no two free ports in a row")


def test_each_worker_serves_its_own_metrics(database_url: str) -> None:
    metrics = _free_port_pair()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        grpc_port = int(sock.getsockname()[1])
    env = {**os.environ, "DATABASE_URL": database_url}
    argv = ["serve", "--workers", "2", "--port", str(grpc_port), "--metrics-port", str(metrics)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        scraped: dict[int, Samples] = {}
        # Each worker's endpoint answers as soon as it listens; its database
        # gauge turns 1 once that worker has connected.
        while len(scraped) < 2:
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the workers' metrics never showed them up"
            for port in (metrics, metrics + 1):
                try:
                    samples = _scrape_sync(port)
                except OSError:
                    time.sleep(0.2)
                    continue
                if value(samples, "booking_database_up") == 1:
                    scraped[port] = samples
                else:
                    time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    assert all(value(s, "booking_database_up") == 1 for s in scraped.values())
