"""Server reflection, as grpc.reflection.v1 and v1alpha, with proto comments.

grpcio-reflection ships only v1alpha, and newer tools (grpcurl, grpcui,
Postman, evans) ask v1 first. The two versions exchange the same messages on
the wire, so one servicer answers both: v1 is registered as a generic
handler under its own service name, reusing the v1alpha message classes.

Descriptors come from gen/booking/v1/descriptor_set.binpb (built by
scripts/gen_protos.py with source info), not from the default pool: the
generated modules carry no comments, and ``FileDescriptor.CopyToProto``
drops source info anyway, so files are answered with the bytes of the set.

Symbols are looked up in an index of those files (``Symbols``), not in the
pool: the pool finds messages, fields and services but not methods or enum
values by their full names, and grpcurl, grpcui, Postman and evans ask for
those (``describe booking.v1.AppointmentService.HoldSlot``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._base import BaseReflectionServicer

V1ALPHA_SERVICE_NAME: str = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)

Request: TypeAlias = reflection_pb2.ServerReflectionRequest
Response: TypeAlias = reflection_pb2.ServerReflectionResponse


def load_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    data = resources.files("booking.v1").joinpath("descriptor_set.binpb").read_bytes()
    return descriptor_pb2.FileDescriptorSet.FromString(data)


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: the v1alpha file under v1's
    names (the messages are identical), so v1 can be described and listed."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old = reflection_pb2.DESCRIPTOR.package
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = V1_PACKAGE
    prefix = f".{old}."
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(prefix):
                f.type_name = f".{V1_PACKAGE}.{f.type_name[len(prefix) :]}"
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(prefix, f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(prefix, f".{V1_PACKAGE}.")
    proto.ClearField("options")
    return proto


V1_FILE = _v1_file()


def _drop_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    """protoc records every field's default JSON name; the runtime's
    descriptors, served before, carry none, and grpcurl then prints the
    proto field names (access_token, not accessToken). Kept that way for
    scripts that read its output; the names are the default ones anyway."""
    for f in message.field:
        f.ClearField("json_name")
    for nested in message.nested_type:
        _drop_json_names(nested)


def build_pool(
    extra: Iterable[descriptor_pb2.FileDescriptorProto] = (),
) -> tuple[descriptor_pool.DescriptorPool, dict[str, bytes]]:
    """A pool of every file the server exposes, and the bytes to answer
    for each file: the commented ones from the descriptor set where there
    are some, the runtime's copy for health and reflection. `extra` adds
    files (a test's proto2 file with extensions)."""
    raw: dict[str, bytes] = {}
    for proto in load_descriptor_set().file:
        for message in proto.message_type:
            _drop_json_names(message)
        raw[proto.name] = proto.SerializeToString()

    def add_runtime(file: descriptor.FileDescriptor) -> None:
        if file.name in raw:
            return
        for dependency in file.dependencies:
            add_runtime(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        raw[file.name] = proto.SerializeToString()

    # Error details too: grpcurl looks up the types in a status's details.
    for runtime in (
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
        error_details_pb2.DESCRIPTOR,
        status_pb2.DESCRIPTOR,
    ):
        add_runtime(runtime)
    raw[V1_FILE.name] = V1_FILE.SerializeToString()
    for proto in extra:
        raw[proto.name] = proto.SerializeToString()
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw[name])
        for dependency in proto.dependency:
            add(dependency)
        pool.Add(proto)
        added.add(name)

    for name in raw:
        add(name)
    return pool, raw


def v1_service_descriptor() -> descriptor.ServiceDescriptor:
    pool, _ = build_pool()
    return pool.FindServiceByName(V1_SERVICE_NAME)


@dataclass
class Symbols:
    """Where every symbol is defined, by the names the standard reflection
    service answers: packages' services and their methods, messages (nested
    too), their fields, oneofs and nested enums, enums and their values
    (under the enum's scope, as in C++, and under the enum itself, as some
    tools ask), and extensions, by name and by (extended type, number)."""

    files: dict[str, str] = field(default_factory=dict)
    extensions: dict[tuple[str, int], str] = field(default_factory=dict)
    extension_numbers: dict[str, set[int]] = field(default_factory=dict)
    messages: set[str] = field(default_factory=set)
    # Enum values under the enum's scope (C++ scoping): answered, but tools
    # built on Go's protobuf name them under the enum itself.
    aliases: set[str] = field(default_factory=set)

    def add(self, name: str, file: str) -> None:
        self.files.setdefault(name, file)

    def add_file(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        package = f"{proto.package}." if proto.package else ""
        for message in proto.message_type:
            self._message(package, message, proto.name)
        for enum in proto.enum_type:
            self._enum(package, enum, proto.name)
        for extension in proto.extension:
            self._extension(package, extension, proto.name)
        for service in proto.service:
            name = f"{package}{service.name}"
            self.add(name, proto.name)
            for method in service.method:
                self.add(f"{name}.{method.name}", proto.name)

    def _message(self, scope: str, message: descriptor_pb2.DescriptorProto, file: str) -> None:
        name = f"{scope}{message.name}"
        self.add(name, file)
        self.messages.add(name)
        for f in message.field:
            self.add(f"{name}.{f.name}", file)
        for oneof in message.oneof_decl:
            self.add(f"{name}.{oneof.name}", file)
        for nested in message.nested_type:
            self._message(f"{name}.", nested, file)
        for enum in message.enum_type:
            self._enum(f"{name}.", enum, file)
        for extension in message.extension:
            self._extension(f"{name}.", extension, file)

    def _enum(self, scope: str, enum: descriptor_pb2.EnumDescriptorProto, file: str) -> None:
        name = f"{scope}{enum.name}"
        self.add(name, file)
        for value in enum.value:
            self.add(f"{name}.{value.name}", file)
            self.add(f"{scope}{value.name}", file)
            self.aliases.add(f"{scope}{value.name}")

    def _extension(self, scope: str, ext: descriptor_pb2.FieldDescriptorProto, file: str) -> None:
        self.add(f"{scope}{ext.name}", file)
        extended = ext.extendee.lstrip(".")
        self.extensions.setdefault((extended, ext.number), file)
        self.extension_numbers.setdefault(extended, set()).add(ext.number)


def index_symbols(raw: dict[str, bytes]) -> Symbols:
    symbols = Symbols()
    for data in raw.values():
        symbols.add_file(descriptor_pb2.FileDescriptorProto.FromString(data))
    return symbols


class ReflectionServicer(BaseReflectionServicer):  # type: ignore[misc]
    """grpcio-reflection's servicer, answering files from the descriptor
    set (with comments) instead of re-serializing them from the pool, and
    every symbol (methods, enum values, extensions too) from an index of
    the files, not from the pool, which knows fewer names."""

    def __init__(
        self,
        service_names: Iterable[str],
        extra_files: Iterable[descriptor_pb2.FileDescriptorProto] = (),
    ) -> None:
        pool, self._raw = build_pool(extra_files)
        self._symbols = index_symbols(self._raw)
        super().__init__(list(service_names), pool=pool)

    def _files(self, request: Request, root: descriptor.FileDescriptor) -> Response:
        seen: dict[str, None] = {}

        def walk(file: descriptor.FileDescriptor) -> None:
            seen[file.name] = None
            for dependency in file.dependencies:
                if dependency.name not in seen:
                    walk(dependency)

        walk(root)
        return Response(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=[self._raw[name] for name in seen]
            ),
            original_request=request,
        )

    def _not_found(self, request: Request) -> Response:
        return Response(
            error_response=reflection_pb2.ErrorResponse(
                error_code=grpc.StatusCode.NOT_FOUND.value[0],
                error_message=grpc.StatusCode.NOT_FOUND.value[1].encode(),
            ),
            original_request=request,
        )

    def _file_named(self, request: Request, filename: str | None) -> Response:
        if filename is None:
            return self._not_found(request)
        try:
            return self._files(request, self._pool.FindFileByName(filename))
        except KeyError:
            return self._not_found(request)

    def _file_by_filename(self, request: Request, filename: str) -> Response:
        return self._file_named(request, filename)

    def _file_containing_symbol(self, request: Request, symbol: str) -> Response:
        return self._file_named(request, self._symbols.files.get(symbol))

    def _file_containing_extension(
        self, request: Request, containing_type: str, extension_number: int
    ) -> Response:
        return self._file_named(
            request, self._symbols.extensions.get((containing_type, extension_number))
        )

    def _all_extension_numbers_of_type(self, request: Request, containing_type: str) -> Response:
        if containing_type not in self._symbols.messages:
            return self._not_found(request)
        numbers = sorted(self._symbols.extension_numbers.get(containing_type, ()))
        return Response(
            all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                base_type_name=containing_type, extension_number=numbers
            ),
            original_request=request,
        )

    async def ServerReflectionInfo(  # noqa: N802 - the RPC's name
        self, requests: AsyncIterator[Request], context: Any
    ) -> AsyncIterator[Response]:
        async for request in requests:
            yield self._answer(request)

    def _answer(self, request: Request) -> Response:
        kind = request.WhichOneof("message_request")
        if kind == "file_by_filename":
            return self._file_by_filename(request, request.file_by_filename)
        if kind == "file_containing_symbol":
            return self._file_containing_symbol(request, request.file_containing_symbol)
        if kind == "file_containing_extension":
            extension = request.file_containing_extension
            return self._file_containing_extension(
                request, extension.containing_type, extension.extension_number
            )
        if kind == "all_extension_numbers_of_type":
            return self._all_extension_numbers_of_type(
                request, request.all_extension_numbers_of_type
            )
        if kind == "list_services":
            return self._list_services(request)
        return Response(
            error_response=reflection_pb2.ErrorResponse(
                error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                error_message=grpc.StatusCode.INVALID_ARGUMENT.value[1].encode(),
            ),
            original_request=request,
        )


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection as v1alpha and v1 (both listed) on `server`."""
    servicer = ReflectionServicer([*service_names, *SERVICE_NAMES])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=Request.FromString,
                response_serializer=Response.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
