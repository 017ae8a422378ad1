"""Keepalive policy and maximum connection age, seen from a real client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import connections
from tests.support import ServerConfig, running_server

READY = grpc.ChannelConnectivity.READY


@contextlib.asynccontextmanager
async def watched_channel(
    port: int, options: list[tuple[str, int]]
) -> AsyncIterator[tuple[grpc.aio.Channel, list[grpc.ChannelConnectivity]]]:
    """A channel, and every connectivity state it passes through."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        states: list[grpc.ChannelConnectivity] = []

        async def watch() -> None:
            state = channel.get_state(try_to_connect=True)
            while True:
                states.append(state)
                await channel.wait_for_state_change(state)
                state = channel.get_state()

        watcher = asyncio.create_task(watch())
        try:
            yield channel, states
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _calls_for(channel: grpc.aio.Channel, seconds: float, pause: float) -> int:
    """Health checks spaced `pause` apart for `seconds`; all must succeed."""
    stub = health_pb2_grpc.HealthStub(channel)
    done = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        done += 1
        await asyncio.sleep(pause)
    return done


async def test_a_client_pinging_every_second_is_not_told_too_many_pings(
    database_url: str,
) -> None:
    async with running_server(database_url, keepalive_min_ping_seconds=0.5) as server:
        assert server.port is not None
        pinging = [
            ("grpc.keepalive_time_ms", 1000),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        async with watched_channel(server.port, pinging) as (channel, states):
            # A stream held open across the window (pings while a call is in
            # flight), and idle stretches between unary calls (pings without).
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            # Quiet: any data the server sends forgives ping strikes.
            await asyncio.sleep(5.0)
            assert await _calls_for(channel, seconds=3.0, pause=1.5) >= 2
            # A GOAWAY (too_many_pings) would have ended the stream
            # (UNAVAILABLE) and dropped the connection.
            assert not watch.done()
            assert states[-1] == READY
            assert states.count(READY) == 1, states
            watch.cancel()


async def test_a_long_lived_channel_outlives_the_connection_age(database_url: str) -> None:
    async with running_server(
        database_url, max_connection_age_seconds=1.0, max_connection_age_grace_seconds=1.0
    ) as server:
        assert server.port is not None
        async with watched_channel(server.port, []) as (channel, states):
            assert await _calls_for(channel, seconds=4.0, pause=0.2) >= 10
            # The server closed the connection at least once and the channel
            # reconnected without a failed call.
            assert states.count(READY) >= 2, states


def test_defaults_permit_pings_every_ten_seconds_and_age_connections_at_half_an_hour() -> None:
    config = ServerConfig.for_tests("postgresql://unused", grace_seconds=7.0)
    options = dict(connections.server_options(config))
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.max_connection_age_ms"] == 1_800_000
    assert options["grpc.max_connection_age_grace_ms"] == 7_000
    never = ServerConfig.for_tests("postgresql://unused", max_connection_age_seconds=0)
    assert dict(connections.server_options(never))["grpc.max_connection_age_ms"] == 2**31 - 1
