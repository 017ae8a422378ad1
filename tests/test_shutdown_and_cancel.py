"""Calls around a shutdown, and calls their clients gave up on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from datetime import timedelta
from typing import Any, cast

import grpc
import pytest

from booking.v1 import slot_pb2 as spb
from service.auth import Authenticator
from service.errors import FieldViolation, InvalidArgument
from service.event_hub import EventHub
from service.interceptor import ServiceInterceptor
from service.sweeper import sweep_forever
from storage.database import Database
from tests.support import Api, hours_from_now, running_server


async def test_calls_sent_just_before_shutdown_are_served_not_cancelled(
    database_url: str,
) -> None:
    codes: Counter[str] = Counter()
    for _round in range(3):
        async with running_server(database_url) as server:
            async with Api.connect(server) as api:
                specialist = await api.specialist()
                request = spb.ListSlotsRequest(specialist_id=specialist.id)
                calls = [
                    asyncio.ensure_future(api.slots.ListSlots(request, metadata=api.md, timeout=10))
                    for _ in range(20)
                ]
                await asyncio.sleep(0.01)
                stopping = server.stop(grace=5)
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                await stopping
        for outcome in outcomes:
            if isinstance(outcome, grpc.aio.AioRpcError):
                codes[outcome.code().name] += 1
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                codes["OK"] += 1
    # Refused before being accepted (UNAVAILABLE) is fine; cancelled after
    # being accepted is not.
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes


async def test_calls_given_up_by_their_clients_log_one_line_and_no_traceback(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    specialist = await api.specialist()
    for i in range(20):
        await api.slot(specialist.id, hours_from_now(10 + i))
    request = spb.ListSlotsRequest(specialist_id=specialist.id)
    calls = int(os.environ.get("BOOKING_CANCEL_CALLS", "1500"))
    caplog.set_level(logging.INFO)
    caplog.clear()
    codes: Counter[str] = Counter()
    for batch in range(calls // 30):
        outcomes = await asyncio.gather(
            *(
                api.slots.ListSlots(request, metadata=api.md, timeout=(1 + (batch + i) % 30) / 1000)
                for i in range(30)
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            codes[outcome.code().name if isinstance(outcome, grpc.aio.AioRpcError) else "OK"] += 1
    await asyncio.sleep(0.5)  # let handlers that outlived their deadline finish
    assert codes["DEADLINE_EXCEEDED"] > 0, codes
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks[:3]]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(caplog.records) <= calls + 5, Counter(r.name for r in caplog.records)


async def test_the_hold_sweeper_reports_a_database_outage_in_one_line(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Not opened: every run() is DatabaseUnavailable, as in an outage.
    db = await Database.connect(database_url, min_size=1, max_size=1, deferred=True)
    caplog.set_level(logging.INFO)
    sweeper = asyncio.create_task(
        sweep_forever(
            db,
            interval=0.05,
            batch_size=10,
            on_release=lambda: None,
            request_id_retention=timedelta(hours=24),
        )
    )
    try:
        await asyncio.sleep(0.3)
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await db.close()
    lines = [r for r in caplog.records if r.name == "service.sweeper"]
    assert lines and all(not r.exc_info and r.levelno == logging.WARNING for r in lines)


async def test_the_event_reader_reports_a_database_outage_once(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Not opened: every read is DatabaseUnavailable, as in an outage, while
    # a stream is open and the reader polls every 20 ms.
    db = await Database.connect(database_url, min_size=1, max_size=1, deferred=True)
    hub = EventHub(db, poll_interval=0.02, max_streams=1)
    caplog.set_level(logging.INFO)
    await hub.start()
    try:
        with hub.stream_slot():
            await asyncio.sleep(0.5)
    finally:
        await hub.stop()
        await db.close()
    lines = [r for r in caplog.records if r.name == "service.event_hub"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING and not lines[0].exc_info


class _ExpiredContext:
    """A grpc.aio context whose deadline has just passed."""

    def __init__(self) -> None:
        self.aborted = False

    def time_remaining(self) -> float:
        return 0.0

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    async def abort_with_status(self, status: object) -> None:
        self.aborted = True
        raise AssertionError("answered a call whose deadline had passed")


@pytest.mark.parametrize("outcome", ["response", "error"])
async def test_a_call_past_its_deadline_is_not_answered(
    outcome: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Answering it makes grpc log ExecuteBatchError with a traceback when
    # its core ended the call before the handler heard of it.
    async def handler(request: object, context: object) -> object:
        if outcome == "error":
            raise InvalidArgument(violations=[FieldViolation("id", "bad")])
        return spb.GetSlotResponse()

    interceptor = ServiceInterceptor(cast(Authenticator, _OpenAuthenticator()))
    wrapped = interceptor._wrap(
        "/grpc.health.v1.Health/Check", grpc.unary_unary_rpc_method_handler(cast(Any, handler))
    )
    context = _ExpiredContext()
    caplog.set_level(logging.INFO)
    with pytest.raises(asyncio.CancelledError):
        await cast(Any, wrapped.unary_unary)(b"", context)
    assert not context.aborted
    assert [r.getMessage() for r in caplog.records] == [
        r.getMessage() for r in caplog.records if "DEADLINE_EXCEEDED" in r.getMessage()
    ]
    assert len(caplog.records) == 1


class _OpenAuthenticator:
    def is_open(self, method: str) -> bool:
        return True
