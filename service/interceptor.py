"""Wraps every handler of every service (booking.v1, health, reflection):
request decoding, authentication and function-level authorization (not for
the open infrastructure services), error mapping, and one log line per RPC
(method, code, duration) carrying the call's request id, its metrics and
its tracing span.

grpc.aio's ServerInterceptor only sees the method name and metadata, so the
work happens in a wrapper around the handler it returns.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn, cast

import grpc
from google.protobuf.message import DecodeError

from service import auth, request_context, telemetry
from service.errors import FieldViolation, InvalidArgument, code_for, internal_status, to_status
from service.grpc_types import Context, ServerInterceptor
from storage import consistency, deadline
from storage.errors import BookingError, DeadlineExceeded

log = logging.getLogger("booking.rpc")

# How far storage's reading of a call's deadline may be ahead of grpc's.
DEADLINE_SLACK_SECONDS = 0.01

Unary = Callable[[Any, Context], Awaitable[Any]]
Streaming = Callable[[Any, Context], AsyncIterator[Any]]


class _Status(
    collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status
):
    pass


def _with_metadata(status: grpc.Status, extra: tuple[tuple[str, str], ...]) -> grpc.Status:
    """`status` with `extra` trailing metadata: an abort replaces what
    set_trailing_metadata set, so the request id has to go in again."""
    return _Status(status.code, status.details, (*status.trailing_metadata, *extra))


class _Call:
    """Book-keeping for one RPC: the code it ended with, and the log line."""

    def __init__(self, method: str, context: Context, *, quiet: bool = False) -> None:
        self.method = method
        self.context = context
        # Health probes and reflection arrive often and matter only when
        # they fail: their successes log at DEBUG.
        self.quiet = quiet
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.reason = ""
        metadata = cast(Iterable[tuple[str, str | bytes]], context.invocation_metadata() or ())
        self.metadata = metadata
        self.span = telemetry.start_rpc_span(method, metadata)
        self.request = request_context.begin(
            request_context.request_id_from(metadata),
            self.span.trace_id if self.span is not None else None,
        )
        self.response_metadata: tuple[tuple[str, str], ...] = (
            (request_context.HEADER, self.request.request_id),
        )
        context.set_trailing_metadata(self.response_metadata)
        # The caller's read-your-writes token(s), for reads served by standbys.
        self.tokens = [
            value if isinstance(value, str) else ""
            for key, value in metadata
            if key == consistency.HEADER
        ]
        self.consistency = consistency.begin(consistency.wanted_from(self.tokens))
        self.metrics = telemetry.metrics()
        if self.metrics.enabled:
            self.metrics.calls_started.add(1, {"grpc.method": method.lstrip("/")})

    def read_token_field(self, request: Any) -> None:
        """A read request's own `consistency_token` field (for callers that
        cannot set metadata, grpcurl's users) counts like one more value of
        the metadata key: the newest of all wins, an unreadable one sends
        the read to the primary."""
        value = _token_field(request)
        if value:
            self.consistency.wanted = consistency.wanted_from([*self.tokens, value])

    def answered(self, response: Any) -> None:
        """An OK answer: a write's token goes with it, in a trailer and in
        the response's `consistency_token` field where it has one."""
        issued = self.consistency.issued
        if issued is not None:
            encoded = issued.encode()
            self.response_metadata = (
                *self.response_metadata,
                (consistency.HEADER, encoded),
            )
            self.context.set_trailing_metadata(self.response_metadata)
            if _has_token_field(response):
                response.consistency_token = encoded

    async def fail(self, exc: BaseException) -> NoReturn:
        """Answer the client for `exc`; always raises."""
        self.give_up_if_expired()
        if isinstance(exc, DeadlineExceeded) and self._expiring():
            # Storage gave up at the call's own deadline, by its own clock a
            # moment before grpc's: grpc is about to end the call itself.
            self.code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise asyncio.CancelledError()
        if isinstance(exc, BookingError):
            self.code = code_for(exc)
            self.reason = exc.reason
            # grpc.aio has abort_with_status; grpc-stubs does not declare it.
            status = to_status(exc, self.request.metadata())
            await self.context.abort_with_status(  # type: ignore[attr-defined]
                _with_metadata(status, self.response_metadata)
            )
        log.error("unhandled error in %s", self.method, exc_info=exc)
        self.code = grpc.StatusCode.INTERNAL
        status = internal_status(self.request.metadata())
        await self.context.abort_with_status(  # type: ignore[attr-defined]
            _with_metadata(status, self.response_metadata)
        )
        raise AssertionError("abort_with_status returned")  # it raises AbortError

    def give_up_if_expired(self) -> None:
        """Raise CancelledError, not answer, once the deadline has passed.

        grpc has already ended such a call (DEADLINE_EXCEEDED) in its core,
        but may not have told this handler yet: an answer sent now fails in
        grpc with ExecuteBatchError, logged with a traceback. Within a
        millisecond of the deadline an answer could not arrive in time.
        """
        remaining = self.context.time_remaining()
        if remaining is not None and remaining < 0.001:
            self.code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise asyncio.CancelledError()

    def _expiring(self) -> bool:
        remaining = self.context.time_remaining()
        return remaining is not None and remaining < DEADLINE_SLACK_SECONDS

    def cancelled(self) -> None:
        """The handler was cancelled: by grpc at the deadline (logged as
        DEADLINE_EXCEEDED, which the client saw), or because the client
        went away (CANCELLED)."""
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining < 0.001
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    def finish(self, items: int | None = None) -> None:
        if self.metrics.enabled:
            self._record()
        if self.span is not None:
            self.span.end(self.code.name)
        if self.quiet and self.code is grpc.StatusCode.OK and not log.isEnabledFor(logging.DEBUG):
            return  # a health check's success, not logged: skip the work
        elapsed_ms = (time.perf_counter() - self.start) * 1000
        extra: dict[str, Any] = {
            "rpc_method": self.method,
            "rpc_code": self.code.name,
            "duration_ms": round(elapsed_ms, 3),
        }
        if self.reason:
            extra["reason"] = self.reason
        if items is not None:
            extra["messages"] = items
        caller = auth.current()
        if caller.user is not None:
            extra["user_id"] = str(caller.user.id)
        if self.code is grpc.StatusCode.INTERNAL:
            level = logging.ERROR
        elif self.quiet and self.code is grpc.StatusCode.OK:
            level = logging.DEBUG
        else:
            level = logging.INFO
        if not log.isEnabledFor(level):
            return
        # The record is made and handled directly: Logger.log would also
        # walk the stack for the caller's file and line (findCaller), which
        # no formatter here shows, on every call.
        log.handle(
            log.makeRecord(
                log.name,
                level,
                __file__,
                0,
                "%s %s %.1fms%s",
                (self.method, self.code.name, elapsed_ms, f" {self.reason}" if self.reason else ""),
                None,
                extra=extra,
            )
        )

    def _record(self) -> None:
        method = self.method.lstrip("/")
        self.metrics.call_duration.record(
            time.perf_counter() - self.start,
            {"grpc.method": method, "grpc.status": self.code.name},
        )
        transition = telemetry.TRANSITIONS.get(self.method)
        if transition is not None:
            self.metrics.transitions.add(
                1, {"transition": transition, "outcome": self.reason or self.code.name}
            )


# The field, request and response alike, that carries a consistency token
# (protos/booking/v1: every write's response, every standby read's request).
TOKEN_FIELD = "consistency_token"


def _has_token_field(message: Any) -> bool:
    descriptor = getattr(message, "DESCRIPTOR", None)
    fields = getattr(descriptor, "fields_by_name", None)
    return fields is not None and TOKEN_FIELD in fields


def _token_field(message: Any) -> str:
    """`message`'s consistency_token, "" if it has none (or is a request
    stream, not a message)."""
    if not _has_token_field(message):
        return ""
    return str(getattr(message, TOKEN_FIELD))


Parser = Callable[[bytes], Any]
Prepare = Callable[[Any], Any]


def _parse(parse: Parser | None, request: Any) -> Any:
    if parse is None:
        return request
    try:
        return parse(request)
    except DecodeError:
        raise InvalidArgument(
            violations=[FieldViolation("request", "not a valid protobuf message for this method")]
        ) from None


def _parser(parse: Parser | None) -> Prepare:
    return lambda request: _parse(parse, request)


def _stream_parser(parse: Parser | None) -> Prepare:
    """Decodes each message of a request stream as the handler reads it, so
    a corrupt one ends the call with INVALID_ARGUMENT, not UNKNOWN."""

    async def each(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for request in requests:
            yield _parse(parse, request)

    return each


def _passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """The method's serializer, except that a message already serialized
    (bytes) is sent as it is: a stream event goes to many streams, and is
    serialized once for all of them (service/servicers/appointments.py)."""
    if serialize is None:
        return None

    def each(message: Any) -> bytes:
        if type(message) is bytes:
            return message
        return serialize(message)

    return each


class ServiceInterceptor(ServerInterceptor):
    def __init__(self, authenticator: auth.Authenticator) -> None:
        self.authenticator = authenticator
        # Wrapped handlers are built once per method, not once per call.
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        # When the last call reached a handler; shutdown waits for a quiet
        # moment so calls already received are served, not cancelled.
        self.last_call_started = 0.0

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = details.method
        self.last_call_started = time.monotonic()
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        # None for an unknown method (grpc-stubs says otherwise): grpc then
        # answers UNIMPLEMENTED itself.
        handler = cast("grpc.RpcMethodHandler[Any, Any] | None", await continuation(details))
        if handler is None:
            return None  # type: ignore[return-value]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # grpc-stubs types handler behaviours as sync ones; under grpc.aio they
        # are coroutine functions and async generators taking an aio context.
        # Requests are decoded inside the wrapper, so undecodable bytes become
        # INVALID_ARGUMENT instead of grpc's UNKNOWN with the parser's
        # exception text (and a traceback in the log).
        raw = {
            "request_deserializer": None,
            "response_serializer": _passing_bytes(handler.response_serializer),
        }
        parse = handler.request_deserializer
        open_ = self.authenticator.is_open(method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, cast(Unary, handler.unary_unary), _parser(parse), open_),
                **raw,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(
                    method, cast(Streaming, handler.unary_stream), _parser(parse), open_
                ),
                **raw,
            )
        # Client-streaming shapes get the same wrappers (the request is an
        # iterator instead of a message), so no RPC escapes authorization.
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(
                    method, cast(Unary, handler.stream_unary), _stream_parser(parse), open_
                ),
                **raw,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(
                method, cast(Streaming, handler.stream_stream), _stream_parser(parse), open_
            ),
            **raw,
        )

    async def _authorize(self, method: str, call: _Call) -> None:
        auth.set_current(await self.authenticator.authorize(method, call.metadata))

    def _unary(self, method: str, inner: Unary, prepare: Prepare, open_: bool) -> Unary:
        async def behavior(request: Any, context: Context) -> Any:
            call = _Call(method, context, quiet=open_)
            deadline.set_remaining(context.time_remaining())
            try:
                try:
                    if not open_:
                        await self._authorize(method, call)
                    message = prepare(request)
                    call.read_token_field(message)
                    response = await inner(message, context)
                except asyncio.CancelledError:
                    call.cancelled()
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped or answered INTERNAL
                    await call.fail(exc)
                call.give_up_if_expired()
                call.answered(response)
                return response
            finally:
                call.finish()

        return behavior

    def _streaming(self, method: str, inner: Streaming, prepare: Prepare, open_: bool) -> Streaming:
        async def behavior(request: Any, context: Context) -> AsyncIterator[Any]:
            call = _Call(method, context, quiet=open_)
            deadline.set_remaining(context.time_remaining())
            sent = 0
            try:
                if not open_:
                    await self._authorize(method, call)
                parsed = prepare(request)
                call.read_token_field(parsed)
                async for message in inner(parsed, context):
                    call.give_up_if_expired()
                    yield message
                    sent += 1
            except asyncio.CancelledError:
                # Re-raised: swallowing it leaks the stream (grpc/grpc#43360).
                if call.code is grpc.StatusCode.OK:
                    call.cancelled()
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped or answered INTERNAL
                await call.fail(exc)
            finally:
                call.finish(items=sent)

        return behavior
