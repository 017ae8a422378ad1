"""Server reflection as grpc.reflection.v1 (what newer tools ask first) and
v1alpha, answering descriptors with their proto comments."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from service.server import BookingServer
from tests.support import Api, failure

V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


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
    grpcurl = Path(sys.executable).parent / "grpcurl"
    process = await asyncio.create_subprocess_exec(
        str(grpcurl),
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
