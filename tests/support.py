"""Helpers for end-to-end tests: a client with every stub, and ready-made
users, specialists and slots."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from booking.v1 import appointment_pb2 as apb
from booking.v1 import (
    appointment_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    schedule_pb2_grpc,
    slot_pb2_grpc,
    specialist_pb2_grpc,
    user_pb2_grpc,
    waitlist_pb2_grpc,
    webhook_pb2_grpc,
)
from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from service import passwords
from service.config import Config
from service.server import BookingServer
from storage import users as user_store
from storage.models import Role

PASSWORD = "correct horse battery staple"


class ServerConfig:
    @staticmethod
    def for_tests(database_url: str, **overrides: Any) -> Config:
        values: dict[str, Any] = dict(
            host="127.0.0.1",
            port=0,
            database_url=database_url,
            data_dir=Path("/nonexistent"),
            pool_min_size=1,
            pool_max_size=20,
            sweep_interval_seconds=3600.0,
            heartbeat_seconds=0.5,
            event_poll_seconds=0.5,
            grace_seconds=1.0,
            migrate_on_start=False,
        )
        values.update(overrides)
        return Config(**values).validate()


def ts(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


def hours_from_now(hours: float) -> datetime:
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return base + timedelta(hours=hours)


@dataclass
class RpcFailure:
    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    violations: list[str]
    # ErrorInfo metadata naming the call (x_request_id, trace_id), kept out
    # of `metadata`: each call has its own, whatever the answer.
    call_ids: dict[str, str] = field(default_factory=dict)


CALL_ID_KEYS = ("x_request_id", "trace_id")


def failure(err: grpc.aio.AioRpcError) -> RpcFailure:
    """Decode a rich error status into its parts."""
    reason, metadata, violations = "", {}, []
    # grpc.aio returns aio.Metadata; grpc-stubs declares the sync Call's type.
    trailing = cast(grpc.aio.Metadata | None, err.trailing_metadata())
    for key, value in trailing or ():
        if key != "grpc-status-details-bin":
            continue
        st = status_pb2.Status.FromString(value)
        for detail in st.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [v.field for v in bad.field_violations]
    call_ids = {key: metadata.pop(key) for key in CALL_ID_KEYS if key in metadata}
    return RpcFailure(err.code(), err.details() or "", reason, metadata, violations, call_ids)


@asynccontextmanager
async def expect_failure(
    code: grpc.StatusCode, reason: str | None = None
) -> AsyncIterator[list[RpcFailure]]:
    """Asserts the block fails with `code` (and ErrorInfo `reason`)."""
    box: list[RpcFailure] = []
    try:
        yield box
    except grpc.aio.AioRpcError as err:
        got = failure(err)
        box.append(got)
        assert got.code == code, f"expected {code}, got {got.code}: {got.message}"
        if reason is not None:
            assert got.reason == reason, (
                f"expected reason {reason}, got {got.reason}: {got.message}"
            )
        assert got.reason, "every error carries an ErrorInfo reason"
        return
    raise AssertionError(f"expected {code}, but the call succeeded")


class Api:
    """Every stub on one channel, plus the caller's token."""

    def __init__(
        self, channel: grpc.aio.Channel, server: BookingServer, token: str | None = None
    ) -> None:
        self.channel = channel
        self.server = server
        self.token = token
        self.users = user_pb2_grpc.UserServiceStub(channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(channel)
        self.specialists = specialist_pb2_grpc.SpecialistServiceStub(channel)
        self.slots = slot_pb2_grpc.SlotServiceStub(channel)
        self.schedules = schedule_pb2_grpc.ScheduleServiceStub(channel)
        self.appointments = appointment_pb2_grpc.AppointmentServiceStub(channel)
        self.waitlist = waitlist_pb2_grpc.WaitlistServiceStub(channel)
        self.webhooks = webhook_pb2_grpc.WebhookServiceStub(channel)

    @classmethod
    @asynccontextmanager
    async def connect(cls, server: BookingServer) -> AsyncIterator[Api]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            api = cls(channel, server)
            api.token = await api.make_token(Role.ADMIN)
            yield api

    def as_(self, token: str | None) -> Api:
        """The same channel, calling as another user (None: anonymous)."""
        return Api(self.channel, self.server, token)

    @property
    def md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    async def make_user(self, role: Role, email: str | None = None) -> tuple[str, str]:
        """Create a user directly in storage; returns (user id, email)."""
        assert self.server.db is not None
        email = email or f"{role.value.lower()}-{uuid.uuid4().hex[:10]}@example.com"
        user = await user_store.create(
            self.server.db,
            email=email,
            password_hash=await passwords.hash_password(PASSWORD),
            role=role,
        )
        return str(user.id), email

    async def login(self, email: str, password: str = PASSWORD) -> str:
        reply = await self.auth.Login(auth_pb2.LoginRequest(email=email, password=password))
        return reply.access_token

    async def make_token(self, role: Role) -> str:
        _, email = await self.make_user(role)
        return await self.login(email)

    async def client(self) -> tuple[Api, str]:
        """A new CLIENT user: its Api and its user id."""
        user_id, email = await self.make_user(Role.CLIENT)
        return self.as_(await self.login(email)), user_id

    # Fixtures built through the API itself.
    async def specialist(
        self, name: str = "Dr. Who", service_type: str = "dentist"
    ) -> sppb.Specialist:
        reply = await self.specialists.CreateSpecialist(
            sppb.CreateSpecialistRequest(full_name=name, service_type=service_type),
            metadata=self.md,
        )
        return reply.specialist

    async def slot(self, specialist_id: str, start: datetime, minutes: int = 30) -> spb.Slot:
        reply = await self.slots.CreateSlot(
            spb.CreateSlotRequest(
                specialist_id=specialist_id,
                start_time=ts(start),
                end_time=ts(start + timedelta(minutes=minutes)),
            ),
            metadata=self.md,
        )
        return reply.slot

    async def hold(self, slot_id: str, user_id: str = "", **kw: Any) -> apb.Appointment:
        reply = await self.appointments.HoldSlot(
            apb.HoldSlotRequest(slot_id=slot_id, user_id=user_id, **kw), metadata=self.md
        )
        return reply.appointment

    async def user_id(self) -> str:
        reply = await self.auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=self.md)
        return reply.user.id


def rollback_through(database_url: str, migration_id: str) -> list[str]:
    """Roll back every migration newer than `migration_id`, then it too;
    returns the ids rolled back, newest first."""
    from storage import migrate

    applied = migrate.applied(database_url)
    return migrate.rollback(database_url, count=len(applied) - applied.index(migration_id))


@asynccontextmanager
async def running_server(database_url: str, **overrides: Any) -> AsyncIterator[BookingServer]:
    """A started server with the test configuration and `overrides`; stopped
    after the block."""
    server = BookingServer(ServerConfig.for_tests(database_url, **overrides))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1)
