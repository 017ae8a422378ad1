"""A rolling upgrade: the previous release keeps serving while this release's
migrations are applied under it, and both releases then serve side by side.

The previous release is taken from git (its tag, or the commit the tag
names) into a temporary directory and run as a real `serve` process against
the database; this test drives it over gRPC throughout the migration.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from booking.v1 import appointment_pb2 as apb
from booking.v1 import (
    appointment_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    slot_pb2,
    slot_pb2_grpc,
    specialist_pb2,
    specialist_pb2_grpc,
)
from storage import migrate
from tests.support import hours_from_now, running_server, ts

ROOT = Path(__file__).resolve().parent.parent
# The release this one must upgrade from without downtime. Its tag is used
# when present; the commit keeps the test meaningful in a clone without tags.
PREVIOUS_RELEASE = ("v0.2.0", "e33f74810163ae556f9731cb7f6cab4506ec2896")
ADMIN_EMAIL, ADMIN_PASSWORD = "upgrade-admin@example.com", "upgrade-admin-password"


def _previous_release_rev() -> str:
    tag, commit = PREVIOUS_RELEASE
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True
    )
    if shallow.stdout.strip() == "true":
        # A shallow clone (some CI systems make one) fetches the history first.
        subprocess.run(
            ["git", "fetch", "--quiet", "--tags", "--unshallow"], cwd=ROOT, capture_output=True
        )
    for rev in (f"{tag}^{{commit}}", commit):
        found = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", rev], cwd=ROOT, capture_output=True
        )
        if found.returncode == 0:
            return found.stdout.decode().strip()
    raise AssertionError(f"previous release {tag} ({commit}) is not in this clone's history")


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(
        ["git", "archive", _previous_release_rev(), "service", "storage", "gen", "migrations"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def _env(release: Path) -> dict[str, str]:
    # The previous release's own packages come first on the path, ahead of
    # this checkout's editable install.
    return {**os.environ, "PYTHONPATH": f"{release}:{release / 'gen'}"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@contextmanager
def _serve_previous(release: Path, database_url: str, *, migrate_on_start: bool) -> Iterator[int]:
    """A `serve` process of the previous release; yields its port."""
    port = _free_port()
    # A file, not a pipe: a server logging a line per call would fill a pipe
    # nobody reads and block.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--database-url", database_url]
        + ["--port", str(port), "--sweep-interval-seconds", "0.2"]
        + ["--migrate-on-start" if migrate_on_start else "--no-migrate-on-start"],
        cwd=release,
        env=_env(release),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        # Ready means SERVING, not listening: a release may listen before
        # its database is ready (and answer UNAVAILABLE until it is).
        while not _serving(port):
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"previous release exited: {log.read().decode()}")
            assert time.monotonic() < deadline, "previous release did not start"
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        # What the previous release logged goes to the test's captured
        # output, which pytest shows when the test fails: an INTERNAL answer
        # is explained only by the traceback behind it.
        sys.stderr.write(log.read().decode(errors="replace"))
        log.close()


@pytest.fixture
def previous_server(previous_release: Path, empty_database_url: str) -> Iterator[int]:
    """The previous release, on its own schema, serving on a loopback port."""
    env = _env(previous_release)
    run = [sys.executable, "-m", "service.cli"]
    subprocess.run(
        [*run, "migrate", "apply", "--database-url", empty_database_url],
        cwd=previous_release,
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*run, "create-admin", "--database-url", empty_database_url]
        + ["--email", ADMIN_EMAIL, "--password-stdin"],
        cwd=previous_release,
        env=env,
        input=ADMIN_PASSWORD.encode(),
        check=True,
        capture_output=True,
    )
    with _serve_previous(previous_release, empty_database_url, migrate_on_start=False) as port:
        yield port


# Consecutive ABORTED answers one step may get before the test calls it a failure.
ABORTED_RETRIES = 5


class _Client:
    """Just enough of the API to book: the protos are wire-compatible."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.auth = auth_pb2_grpc.AuthServiceStub(channel)
        self.specialists = specialist_pb2_grpc.SpecialistServiceStub(channel)
        self.slots = slot_pb2_grpc.SlotServiceStub(channel)
        self.appointments = appointment_pb2_grpc.AppointmentServiceStub(channel)
        self.metadata: tuple[tuple[str, str], ...] = ()

    async def setup(self, slots: int) -> list[str]:
        login = await self.auth.Login(
            auth_pb2.LoginRequest(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        )
        self.metadata = (("authorization", f"Bearer {login.access_token}"),)
        specialist = await self.specialists.CreateSpecialist(
            specialist_pb2.CreateSpecialistRequest(full_name="Dr. Upgrade", service_type="x"),
            metadata=self.metadata,
        )
        start = hours_from_now(48)
        batch = await self.slots.BatchCreateSlots(
            slot_pb2.BatchCreateSlotsRequest(
                requests=[
                    slot_pb2.CreateSlotRequest(
                        specialist_id=specialist.specialist.id,
                        start_time=ts(start + timedelta(minutes=30 * i)),
                        end_time=ts(start + timedelta(minutes=30 * (i + 1))),
                    )
                    for i in range(slots)
                ]
            ),
            metadata=self.metadata,
        )
        return [s.id for s in batch.slots]

    async def _call(self, rpc: Any, request: Any) -> Any:
        """One step, retried as a client is told to when it is ABORTED.

        Every loop books as the same admin, so their transitions contend on
        that user's lock row; on a loaded machine a step can lose the race
        ten times and be answered ABORTED (TRANSACTION_CONFLICT, "retry"),
        with nothing written. Anything else, or a step that keeps being
        ABORTED, is a failure the test reports."""
        for attempt in range(ABORTED_RETRIES):
            try:
                return await rpc(request, metadata=self.metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.ABORTED or attempt == ABORTED_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def book_and_cancel(self, slot_id: str) -> None:
        held = await self._call(self.appointments.HoldSlot, apb.HoldSlotRequest(slot_id=slot_id))
        appointment = held.appointment.id
        await self._call(
            self.appointments.ConfirmAppointment, apb.ConfirmAppointmentRequest(id=appointment)
        )
        await self._call(
            self.appointments.GetAppointment, apb.GetAppointmentRequest(id=appointment)
        )
        await self._call(
            self.appointments.CancelAppointment,
            apb.CancelAppointmentRequest(id=appointment, reason="upgrade"),
        )

    async def hold(self, slot_id: str, request_id: str) -> str:
        held = await self.appointments.HoldSlot(
            apb.HoldSlotRequest(slot_id=slot_id, request_id=request_id), metadata=self.metadata
        )
        return str(held.appointment.id)

    async def replays(self, kept: dict[str, str], refused: tuple[str, str]) -> None:
        """Request ids stored before the upgrade answer as they first did: a
        success with its appointment, a refusal with its reason."""
        for request_id, slot_id in kept.items():
            appointment = await self.hold(slot_id.split("/")[0], request_id)
            assert appointment == slot_id.split("/")[1]
        request_id, slot_id = refused
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await self.hold(slot_id, request_id)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()


async def test_previous_release_keeps_serving_while_migrations_apply(
    previous_release: Path, previous_server: int, empty_database_url: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{previous_server}") as channel:
        old = _Client(channel)
        *slots, kept_slot = await old.setup(slots=9)
        # Request ids the previous release stores: a success, and a refusal
        # (the slot is taken) it remembers.
        kept_id, refused_id = str(uuid.uuid4()), str(uuid.uuid4())
        kept = {kept_id: f"{kept_slot}/{await old.hold(kept_slot, kept_id)}"}
        refused = (refused_id, kept_slot)
        with pytest.raises(grpc.aio.AioRpcError):
            await old.hold(kept_slot, refused_id)
        failures: list[grpc.aio.AioRpcError] = []
        migrated = asyncio.Event()
        rounds_after = 0

        async def traffic(slot_id: str) -> None:
            nonlocal rounds_after
            while True:
                done_before = migrated.is_set()
                try:
                    await old.book_and_cancel(slot_id)
                except grpc.aio.AioRpcError as err:
                    failures.append(err)
                if done_before:
                    rounds_after += 1
                    if rounds_after >= 3 * len(slots):
                        return

        async def upgrade() -> list[str]:
            await asyncio.sleep(0.3)  # traffic is flowing first
            applied = await asyncio.to_thread(migrate.apply, empty_database_url)
            migrated.set()
            return applied

        results = await asyncio.gather(upgrade(), *(traffic(s) for s in slots))
        assert not failures, [f"{e.code().name}: {e.details()}" for e in failures]
        every = sorted(
            m.stem for m in (ROOT / "migrations").glob("[0-9]*.sql") if ".rollback" not in m.name
        )
        contract = migrate.contract_ids()
        assert contract, "this release has a contract migration"
        # Expand only: the contract waits for the previous release to go.
        assert migrate.applied(empty_database_url) == [m for m in every if m not in contract]
        assert isinstance(results[0], list)
        await old.replays(kept, refused)

        # Both releases now serve the same database side by side.
        async with running_server(empty_database_url) as new:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{new.port}") as new_channel:
                current = _Client(new_channel)
                current.metadata = old.metadata
                await current.book_and_cancel(slots[0])
                await current.replays(kept, refused)
            await old.book_and_cancel(slots[1])

    # A previous-release replica restarting now (migrating at start-up, as
    # by default) meets migrations it does not know, and still serves.
    with _serve_previous(previous_release, empty_database_url, migrate_on_start=True) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            restarted = _Client(channel)
            restarted.metadata = old.metadata
            await restarted.book_and_cancel(slots[2])

    # Contract: no replica of the previous release is left, so what only it
    # called is dropped; this release serves on, and replays what the
    # previous one stored.
    assert await asyncio.to_thread(migrate.apply, empty_database_url) == []
    assert (
        await asyncio.to_thread(lambda: migrate.apply(empty_database_url, contract=True))
        == contract
    )
    assert migrate.applied(empty_database_url) == every
    async with running_server(empty_database_url) as new:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{new.port}") as new_channel:
            current = _Client(new_channel)
            current.metadata = old.metadata
            await current.book_and_cancel(slots[3])
            await current.replays(kept, refused)
    # What was dropped was the previous release's: it can no longer hold.
    with _serve_previous(previous_release, empty_database_url, migrate_on_start=False) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            gone = _Client(channel)
            gone.metadata = old.metadata
            with pytest.raises(grpc.aio.AioRpcError):
                await gone.book_and_cancel(slots[4])


async def test_replicas_starting_together_apply_migrations_once(empty_database_url: str) -> None:
    # Every replica migrates at start-up by default; yoyo's lock serialises
    # them, so each migration runs exactly once and none fails.
    results = await asyncio.gather(
        *(asyncio.to_thread(migrate.apply, empty_database_url) for _ in range(4))
    )
    applied = [ids for ids in results if ids]
    assert len(applied) == 1, results
    assert sorted(applied[0]) == migrate.applied(empty_database_url)
