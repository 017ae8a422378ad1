"""Fuzzing every RPC the server exposes: booking.v1, health and reflection.

Methods are enumerated from the service descriptors and called with raw
bytes (identity serializers): random but well-formed messages, messages
with invalid UTF-8 in a string field, and corrupt bytes. No answer may be
UNKNOWN or INTERNAL, none may carry exception text, and the server logs at
most one line per request, never a traceback.

Seeded; BOOKING_FUZZ_CASES sets how many requests (default 600) and
BOOKING_FUZZ_SEED the seed.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import string
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from google.protobuf import descriptor
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from booking.v1 import (
    appointment_pb2,
    auth_pb2,
    calendar_pb2,
    slot_pb2,
    specialist_pb2,
    user_pb2,
    webhook_pb2,
)
from service.errors import FieldViolation, InvalidArgument, to_status
from service.reflection import v1_service_descriptor
from service.server import BookingServer
from storage.errors import EmailTaken, InvalidValue
from tests.support import Api, failure

CASES = int(os.environ.get("BOOKING_FUZZ_CASES", "600"))
SEED = int(os.environ.get("BOOKING_FUZZ_SEED", "20261130"))
EOF = cast(Any, grpc.aio).EOF  # grpc-stubs does not declare it
FORBIDDEN_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
LEAKS = ("Traceback", "Unexpected <class", "DecodeError", "Exception", "asyncpg", 'File "')

SERVICES: list[descriptor.ServiceDescriptor] = [
    *(
        module.DESCRIPTOR.services_by_name[name]
        for module in (
            user_pb2,
            auth_pb2,
            specialist_pb2,
            slot_pb2,
            appointment_pb2,
            calendar_pb2,
            webhook_pb2,
        )
        for name in module.DESCRIPTOR.services_by_name
    ),
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    # grpcio-reflection has no v1 module; the server's own descriptor of it.
    v1_service_descriptor(),
]


@dataclass(frozen=True)
class Method:
    path: str
    input: descriptor.Descriptor
    client_streaming: bool
    server_streaming: bool


METHODS = [
    Method(f"/{service.full_name}/{m.name}", m.input_type, m.client_streaming, m.server_streaming)
    for service in SERVICES
    for m in service.methods
]


class Garbage:
    """Random request bytes for a message type."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def text(self) -> str:
        r = self.rng.random()
        if r < 0.2:
            return ""
        if r < 0.4:
            return str(__import__("uuid").UUID(int=self.rng.getrandbits(128)))
        if r < 0.6:
            alphabet = string.printable + "\x00\u00e4\u2603\U0001f600\ufffd"
            return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(1, 40)))
        if r < 0.7:
            return "x" * self.rng.choice([255, 256, 1000, 5000])
        return self.rng.choice(["' OR 1=1 --", "%s%n", "../../etc/passwd", "-1", "9" * 30])

    def scalar(self, field: Any) -> Any:
        t, rng = field.type, self.rng
        if t == F.TYPE_STRING:
            return self.text()
        if t == F.TYPE_BYTES:
            return rng.randbytes(rng.randint(0, 20))
        if t == F.TYPE_BOOL:
            return rng.random() < 0.5
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return rng.choice([0.0, -1.5, 1e300 if t == F.TYPE_DOUBLE else 1e30, rng.random()])
        if t == F.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return rng.choice([*values, -1, 99, 2**31 - 1])
        unsigned = t in (F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_FIXED32, F.TYPE_FIXED64)
        bits = (
            64
            if t in (F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64)
            else 32
        )
        low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return rng.choice([low, high, 0, 1, -1 if not unsigned else 2, rng.randint(low, high)])

    def fill(self, message: Message, depth: int = 0) -> Message:
        for field in message.DESCRIPTOR.fields:
            if self.rng.random() < 0.4:
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                continue
            if field.type == F.TYPE_MESSAGE:
                if depth > 2:
                    continue
                if field.is_repeated:
                    for _ in range(self.rng.randint(0, 3)):
                        self.fill(getattr(message, field.name).add(), depth + 1)
                else:
                    self.fill(getattr(message, field.name), depth + 1)
                    getattr(message, field.name).SetInParent()
            elif field.is_repeated:
                getattr(message, field.name).extend(
                    self.scalar(field) for _ in range(self.rng.randint(0, 3))
                )
            else:
                setattr(message, field.name, self.scalar(field))
        return message

    def payload(self, input_type: descriptor.Descriptor) -> tuple[str, bytes]:
        message = self.fill(GetMessageClass(input_type)())
        valid = message.SerializeToString()
        kind = self.rng.choice(["valid", "valid", "utf8", "utf8", "random", "truncated", "flipped"])
        if kind == "valid":
            return kind, valid
        if kind == "utf8":
            strings = [f for f in input_type.fields if f.type == F.TYPE_STRING] or None
            number = self.rng.choice(strings).number if strings else 1
            bad = self.rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"ok\xf8\x88\x80\x80\x80"])
            return kind, valid + _varint(number << 3 | 2) + _varint(len(bad)) + bad
        if kind == "random":
            return kind, self.rng.randbytes(self.rng.randint(1, 64))
        if kind == "truncated" and len(valid) > 1:
            return kind, valid[: self.rng.randint(1, len(valid) - 1)]
        flipped = bytearray(valid or b"\x0a\x02ok")
        for _ in range(self.rng.randint(1, 3)):
            flipped[self.rng.randrange(len(flipped))] = self.rng.randrange(256)
        return "flipped", bytes(flipped)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def _call(
    channel: grpc.aio.Channel, method: Method, payloads: list[bytes], md: list[tuple[str, str]]
) -> tuple[grpc.StatusCode, str]:
    """The final code and details of one call (streams: after at most two
    responses, when the server has not ended them by then)."""
    kw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    try:
        if not method.client_streaming and not method.server_streaming:
            await channel.unary_unary(method.path, **kw)(payloads[0], metadata=md, timeout=10)
            return grpc.StatusCode.OK, ""
        call: Any
        if method.client_streaming:
            # One message, then its answer, then the next: the grpc client
            # reports a write after the server ended the call as INTERNAL
            # itself (grpc/grpc#36066), which would hide the server's answer.
            call = channel.stream_stream(method.path, **kw)(None, metadata=md, timeout=10)
            for payload in payloads:
                await call.write(payload)
                if await call.read() is EOF:
                    return await call.code(), await call.details() or ""
            await call.done_writing()
        else:
            call = channel.unary_stream(method.path, **kw)(payloads[0], metadata=md, timeout=10)
        try:
            while True:
                async with asyncio.timeout(0.3):
                    if await call.read() is EOF:
                        return await call.code(), await call.details() or ""
        except TimeoutError:
            call.cancel()  # a live stream (Watch...): it answered well so far
            return grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""


def _cases(rng: random.Random, count: int) -> Iterator[tuple[Method, str, list[bytes], bool]]:
    garbage = Garbage(rng)
    for i in range(count):
        method = METHODS[i % len(METHODS)] if i < len(METHODS) else rng.choice(METHODS)
        kinds, payloads = [], []
        for _ in range(rng.randint(1, 3) if method.client_streaming else 1):
            kind, payload = garbage.payload(method.input)
            kinds.append(kind)
            payloads.append(payload)
        yield method, "+".join(kinds), payloads, rng.random() < 0.7


async def test_fuzzing_every_rpc_gets_no_unknown_internal_leak_or_traceback(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    assert {m.path.split("/")[1] for m in METHODS} >= {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
        "booking.v1.SlotService",
    }
    assert "/grpc.health.v1.Health/List" in {m.path for m in METHODS}
    rng = random.Random(SEED)
    caplog.set_level(logging.INFO)
    caplog.clear()
    codes: Counter[str] = Counter()
    problems: list[str] = []
    cases = list(_cases(rng, CASES))
    for start in range(0, len(cases), 25):
        batch = cases[start : start + 25]
        results = await asyncio.gather(
            *(_call(api.channel, m, p, api.md if auth else []) for m, _, p, auth in batch)
        )
        for (method, kind, _, _), (code, details) in zip(batch, results, strict=True):
            codes[code.name] += 1
            if code in FORBIDDEN_CODES or any(leak in details for leak in LEAKS):
                problems.append(f"{method.path} [{kind}]: {code.name} {details!r}")
    assert not problems, problems[:10]
    assert codes["INVALID_ARGUMENT"] > 0 and codes["OK"] > 0, codes
    records = caplog.records
    tracebacks = [r for r in records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage()[:300] for r in tracebacks[:3]]
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage()[:300] for r in errors[:3]]
    # One line per request at most (streams that were cancelled included).
    assert len(records) <= len(cases), Counter(r.name for r in records).most_common(5)


# --- bounded error details -----------------------------------------------------


async def test_a_thousand_invalid_batch_entries_fit_a_default_client(api: Api) -> None:
    request = slot_pb2.BatchCreateSlotsRequest(
        requests=[slot_pb2.CreateSlotRequest(specialist_id=f"not-a-uuid-{i}") for i in range(1000)]
    )
    # api.channel has grpc's default limits (received metadata: 8 KiB soft,
    # 16 KiB hard); past the soft limit grpc refuses a share of calls at random.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.slots.BatchCreateSlots(request, metadata=api.md)
    got = failure(refused.value)
    assert got.code == grpc.StatusCode.INVALID_ARGUMENT, got.message
    total, omitted = int(got.metadata["violations"]), int(got.metadata["violations_omitted"])
    assert total >= 1000 and omitted > 0
    assert len(got.violations) + omitted == total
    assert got.violations[0] == "requests[0].specialist_id"
    assert f"(and {omitted} more)" in got.message


def test_every_status_fits_default_metadata_limits_whatever_its_texts() -> None:
    huge = "\u2603" * 50_000
    for exc in (
        InvalidArgument(violations=[FieldViolation(huge, huge) for _ in range(50)]),
        InvalidArgument(violations=[FieldViolation(f"f{i}", "bad") for i in range(100_000)]),
        InvalidValue(field=huge, description=huge),
        EmailTaken(email=huge),
    ):
        status = to_status(exc)
        size = 0
        for key, value in status.trailing_metadata:
            raw = value if isinstance(value, bytes) else value.encode()
            size += len(key) + (len(base64.b64encode(raw)) if key.endswith("-bin") else len(raw))
        size += len(urllib.parse.quote(status.details.encode()))  # grpc-message
        assert size < 8 * 1024 - 512, (type(exc).__name__, size)


# --- health and reflection ------------------------------------------------------


async def test_health_lists_every_service_and_refuses_unknown_ones(api: Api) -> None:
    stub = health_pb2_grpc.HealthStub(api.channel)
    listed = await stub.List(health_pb2.HealthListRequest(), timeout=5)
    assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING
    assert (
        listed.statuses["booking.v1.SlotService"].status == health_pb2.HealthCheckResponse.SERVING
    )
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    got = failure(unknown.value)
    assert got.code == grpc.StatusCode.NOT_FOUND and got.reason == "SERVICE_NOT_FOUND"


async def test_health_watch_reports_shutdown_and_ends(server: BookingServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        first = await call.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = server.stop(grace=5)
        second = await call.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        await stopping
    assert failure(ended.value).reason == "SHUTTING_DOWN"


async def test_a_corrupt_message_later_in_a_reflection_stream_is_invalid_argument(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    call = api.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=None,
        response_deserializer=None,
    )(None, timeout=10)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString())
    listed = reflection_pb2.ServerReflectionResponse.FromString(await call.read())
    assert "booking.v1.SlotService" in {s.name for s in listed.list_services_response.service}
    await call.write(b"\x22\x02\xff\xfe")  # file_containing_symbol, invalid UTF-8
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert failure(refused.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info]
