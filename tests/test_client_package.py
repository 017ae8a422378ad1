"""The client package (clients/python): installed into a clean virtual
environment, with no server code, and its examples run against a real server."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from booking.v1 import appointment_pb2 as apb
from booking.v1 import appointment_pb2_grpc
from booking_client import (
    Backoff,
    CursorExpired,
    EventConsumer,
    FieldViolation,
    MemoryCheckpoint,
    Session,
    error_details,
    insecure_channel,
    service_config,
)
from service.server import BookingServer
from storage.models import Role
from tests.support import PASSWORD, Api, ServerConfig, hours_from_now
from tests.venvs import ROOT, clean_env, importable, make_venv, pip

CLIENT = ROOT / "clients" / "python"
EXAMPLES = CLIENT / "examples"


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    python = make_venv(tmp_path_factory.mktemp("client") / "venv")
    pip(python, str(CLIENT), cwd=python.parent.parent)
    return python


def _venv_run(python: Path, code: str) -> str:
    return subprocess.run(
        [str(python), "-c", code],
        cwd=python.parent.parent,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_package_has_no_server_dependencies(client_venv: Path) -> None:
    outside = client_venv.parent.parent
    for module in ("booking_client", "booking.v1.appointment_pb2_grpc", "google.rpc.status_pb2"):
        assert importable(client_venv, module, outside), module
    for module in ("service", "storage", "bench", "asyncpg", "pgserver", "yoyo", "psycopg"):
        assert not importable(client_venv, module, outside), module
    requires = json.loads(
        _venv_run(
            client_venv,
            "import importlib.metadata as m, json; print(json.dumps(m.requires('booking-client')))",
        )
    )
    names = {re.split(r"[<>=;\[ ]", req, maxsplit=1)[0].lower() for req in requires}
    assert names == {"grpcio", "protobuf", "googleapis-common-protos"}


def test_shipped_stubs_are_the_generated_code(client_venv: Path) -> None:
    installed = Path(_venv_run(client_venv, "import booking; print(booking.__file__)").strip())
    generated = ROOT / "gen" / "booking"

    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    assert files(installed.parent) == files(generated)


async def _example(
    python: Path, script: str, *args: str, password: str = PASSWORD
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(python),
        str(EXAMPLES / script),
        *args,
        cwd=python.parent.parent,
        env=clean_env(BOOKING_PASSWORD=password),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _finish(proc: asyncio.subprocess.Process, seconds: float = 60) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), seconds)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _book(python: Path, target: str, email: str, specialist_id: str) -> str:
    """Run book.py; the confirmed appointment's id."""
    proc = await _example(
        python, "book.py", "--target", target, "--email", email, "--specialist-id", specialist_id
    )
    code, out, err = await _finish(proc)
    assert code == 0, out + err
    confirmed = re.search(r"^confirmed (\S+)$", out, re.MULTILINE)
    assert confirmed, out
    appointment = confirmed.group(1)
    assert f"appointment {appointment} is APPOINTMENT_STATUS_CONFIRMED" in out, out
    assert "same request_id: same appointment: True" in out, out
    assert "refused: FAILED_PRECONDITION SLOT_UNAVAILABLE" in out, out
    return appointment


def _events(out: str) -> list[tuple[str, str]]:
    return re.findall(r"^APPOINTMENT_EVENT_TYPE_(\w+) appointment=(\S+)", out, re.MULTILINE)


async def test_examples_book_and_watch_with_resume(
    client_venv: Path, server: BookingServer, database_url: str, tmp_path: Path
) -> None:
    port = server.port
    assert port is not None
    target = f"127.0.0.1:{port}"
    async with Api.connect(server) as admin:
        specialist = await admin.specialist()
        for hour in (30, 31):
            await admin.slot(specialist.id, hours_from_now(hour))
        _, client_email = await admin.make_user(Role.CLIENT)
        _, operator_email = await admin.make_user(Role.OPERATOR)

    first = await _book(client_venv, target, client_email, specialist.id)

    checkpoint = tmp_path / "events.cursor"
    watch_args = ["--target", target, "--email", operator_email, "--checkpoint", str(checkpoint)]
    watch_args += ["--specialist-id", specialist.id, "--max-events", "2"]
    code, out, err = await _finish(await _example(client_venv, "watch.py", *watch_args))
    assert code == 0, out + err
    assert _events(out) == [("HELD", first), ("CONFIRMED", first)], out
    saved = checkpoint.read_text().strip()
    assert saved and saved in out.splitlines()[-1], "the last cursor was checkpointed"

    # Second run: resumes after the checkpoint, survives a server restart
    # (reconnecting with backoff), and sees only what came after.
    watcher = await _example(client_venv, "watch.py", *watch_args)
    assert watcher.stderr is not None
    log: list[str] = []

    async def wait_for_log(pattern: str) -> None:
        assert watcher.stderr is not None
        while not any(re.search(pattern, line) for line in log):
            line = (await asyncio.wait_for(watcher.stderr.readline(), 60)).decode()
            assert line, "watcher exited:\n" + "".join(log)
            log.append(line)

    await wait_for_log(rf"watching after cursor {re.escape(saved)}$")
    await wait_for_log(r"stream open$")
    await server.stop(grace=1)
    await wait_for_log(r"stream lost \(UNAVAILABLE SHUTTING_DOWN: .*reconnecting in")
    restarted = BookingServer(ServerConfig.for_tests(database_url, port=port))
    await restarted.start()
    try:
        second = await _book(client_venv, target, client_email, specialist.id)
        rest_out, rest_err = await asyncio.wait_for(watcher.communicate(), 60)
        assert watcher.returncode == 0, "".join(log) + rest_err.decode()

        # Wrong credentials stop the consumer instead of retrying forever.
        code, out, err = await _finish(
            await _example(client_venv, "watch.py", *watch_args, password="wrong password!")
        )
        assert code == 2, out + err
        assert "stream refused: UNAUTHENTICATED" in err, err
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
        await restarted.stop(grace=1)
    log_text = "".join(log) + rest_err.decode()
    assert _events(rest_out.decode()) == [("HELD", second), ("CONFIRMED", second)], rest_out
    assert log_text.count("watching after cursor") >= 2, log_text


class _ScriptedWatch(appointment_pb2_grpc.AppointmentServiceServicer):
    """Answers each WatchAppointmentEvents call from a script, recording requests."""

    def __init__(self) -> None:
        self.requests: list[apb.WatchAppointmentEventsRequest] = []

    async def WatchAppointmentEvents(  # noqa: N802 - the generated name
        self,
        request: apb.WatchAppointmentEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[apb.WatchAppointmentEventsResponse]:
        self.requests.append(request)
        if len(self.requests) == 1:
            yield apb.WatchAppointmentEventsResponse(heartbeat=apb.Heartbeat(cursor="h1"))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        elif len(self.requests) == 2:
            yield apb.WatchAppointmentEventsResponse(
                event=apb.AppointmentEvent(cursor="e2", type=apb.APPOINTMENT_EVENT_TYPE_HELD)
            )
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "slow")
        else:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "cursor older than the history")


async def test_consumer_checkpoints_heartbeats_resumes_and_reports_expired_cursor() -> None:
    # Only the one method is implemented; the stub's abstract others answer UNIMPLEMENTED.
    servicer = _ScriptedWatch()  # type: ignore[abstract]
    fake = grpc.aio.server()
    appointment_pb2_grpc.add_AppointmentServiceServicer_to_server(servicer, fake)
    port = fake.add_insecure_port("127.0.0.1:0")
    await fake.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            checkpoint = MemoryCheckpoint()
            seen: list[str] = []

            async def handle(event: apb.AppointmentEvent) -> None:
                seen.append(event.cursor)

            consumer = EventConsumer(
                channel, checkpoint, backoff=Backoff(initial=0.01, maximum=0.05)
            )
            with pytest.raises(CursorExpired, match="older than the event history") as raised:
                await consumer.run(handle)
    finally:
        await fake.stop(None)
    assert raised.value.cursor == "e2"
    assert seen == ["e2"]
    starts = [r.WhichOneof("start") for r in servicer.requests]
    assert starts == ["start_position", "after_cursor", "after_cursor"]
    assert servicer.requests[0].start_position == apb.WATCH_START_POSITION_BEGINNING
    assert [r.after_cursor for r in servicer.requests[1:]] == ["h1", "e2"]


class _Flaky(appointment_pb2_grpc.AppointmentServiceServicer):
    """GetAppointment: UNAVAILABLE twice, then an answer; HoldSlot: a rich error;
    ConfirmAppointment: slower than any sane timeout."""

    def __init__(self) -> None:
        self.gets = 0

    async def GetAppointment(  # noqa: N802 - the generated name
        self, request: apb.GetAppointmentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.GetAppointmentResponse:
        self.gets += 1
        if self.gets <= 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "database unavailable")
        return apb.GetAppointmentResponse(appointment=apb.Appointment(id=request.id))

    async def HoldSlot(  # noqa: N802 - the generated name
        self, request: apb.HoldSlotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.HoldSlotResponse:
        info = error_details_pb2.ErrorInfo(
            reason="INVALID_ARGUMENT", domain="booking.v1", metadata={"field": "slot_id"}
        )
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="slot_id", description="not a UUID"
                )
            ]
        )
        details = [any_pb2.Any(), any_pb2.Any()]
        details[0].Pack(info)
        details[1].Pack(bad)
        status = status_pb2.Status(
            code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad", details=details
        )
        # grpc.aio has abort_with_status; grpc-stubs does not declare it.
        await context.abort_with_status(rpc_status.to_status(status))  # type: ignore[attr-defined]
        raise AssertionError("unreachable")

    async def ConfirmAppointment(  # noqa: N802 - the generated name
        self, request: apb.ConfirmAppointmentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.ConfirmAppointmentResponse:
        await asyncio.sleep(5)
        return apb.ConfirmAppointmentResponse()


async def test_channel_retries_unavailable_applies_timeouts_and_decodes_details() -> None:
    servicer = _Flaky()  # type: ignore[abstract]
    fake = grpc.aio.server()
    appointment_pb2_grpc.add_AppointmentServiceServicer_to_server(servicer, fake)
    port = fake.add_insecure_port("127.0.0.1:0")
    await fake.start()
    config = service_config()
    assert config["methodConfig"][0]["timeout"] == "10s"
    # Shortened so that the test need not wait: 1 s is what grpcio's own
    # service-config timeout gets wrong (it fails such a call at once).
    config["methodConfig"][0]["timeout"] = "1s"
    config["methodConfig"][0]["retryPolicy"]["initialBackoff"] = "0.01s"
    try:
        async with insecure_channel(f"127.0.0.1:{port}", config=config) as channel:
            stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
            reply = await stub.GetAppointment(apb.GetAppointmentRequest(id="a1"))
            assert reply.appointment.id == "a1"
            assert servicer.gets == 3, "two UNAVAILABLE answers retried by the service config"

            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.HoldSlot(apb.HoldSlotRequest(slot_id="x"))
            details = error_details(failed.value)
            assert (details.code, details.reason, details.domain) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
                "booking.v1",
            )
            assert details.metadata == {"field": "slot_id"}
            assert details.field_violations == (FieldViolation("slot_id", "not a UUID"),)

            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as slow:
                await stub.ConfirmAppointment(apb.ConfirmAppointmentRequest(id="a1"))
            assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started >= 0.9, "the timeout is not cut short"
    finally:
        await fake.stop(None)


class _FieldOnly(appointment_pb2_grpc.AppointmentServiceServicer):
    """HoldSlot answers with a token in the response field and no trailer (a
    proxy that drops trailers); GetAppointment records the tokens it got."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    async def HoldSlot(  # noqa: N802 - the generated name
        self, request: apb.HoldSlotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.HoldSlotResponse:
        return apb.HoldSlotResponse(consistency_token=f"token-{request.slot_id}")

    async def GetAppointment(  # noqa: N802 - the generated name
        self, request: apb.GetAppointmentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.GetAppointmentResponse:
        self.seen.append(
            [
                str(value)
                for key, value in context.invocation_metadata() or ()
                if key == "x-booking-consistency-token"
            ]
        )
        return apb.GetAppointmentResponse(appointment=apb.Appointment(id=request.id))


async def test_a_session_takes_tokens_from_the_response_field() -> None:
    servicer = _FieldOnly()  # type: ignore[abstract]
    fake = grpc.aio.server()
    appointment_pb2_grpc.add_AppointmentServiceServicer_to_server(servicer, fake)
    port = fake.add_insecure_port("127.0.0.1:0")
    await fake.start()
    session = Session()
    try:
        async with insecure_channel(f"127.0.0.1:{port}", interceptors=[session]) as channel:
            stub = appointment_pb2_grpc.AppointmentServiceStub(channel)
            await stub.GetAppointment(apb.GetAppointmentRequest(id="a1"))
            await stub.HoldSlot(apb.HoldSlotRequest(slot_id="s1"))
            await stub.HoldSlot(apb.HoldSlotRequest(slot_id="s2"))
            await stub.GetAppointment(apb.GetAppointmentRequest(id="a1"))
        assert session.tokens == ("token-s1", "token-s2")
        assert servicer.seen == [[], ["token-s1", "token-s2"]]
    finally:
        await fake.stop(None)
