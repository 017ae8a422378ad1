"""Operating the service: health, configuration, logs, shutdown."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import config as config_module
from service import server as server_module
from service.config import ConfigError, from_sources
from service.logs import JsonFormatter
from service.server import BookingServer
from tests.support import ServerConfig

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)


async def _wait_for_health(port: int, want: int, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.1)):
        if await _health(port) == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"health never became {want}")


async def test_health_is_not_serving_while_the_database_is_unreachable(
    database_url: str, pg_admin_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "HEALTH_CHECK_SECONDS", 0.1)
    server = BookingServer(ServerConfig.for_tests(database_url))
    await server.start()
    assert server.port is not None
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin_url)
    try:
        assert await _health(server.port) == SERVING
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await _wait_for_health(server.port, NOT_SERVING)
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await _wait_for_health(server.port, SERVING)
    finally:
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await admin.close()
        await server.stop(grace=1)


async def test_shutdown_is_safe_to_call_twice_and_reports_not_serving(database_url: str) -> None:
    server = BookingServer(ServerConfig.for_tests(database_url))
    await server.start()
    first = server.stop(grace=1)
    second = server.stop(grace=1)
    assert first is second
    await asyncio.gather(first, second)
    assert server.db is not None and server.db.pool.is_closing()


def test_flags_override_environment_which_overrides_defaults() -> None:
    parser = argparse.ArgumentParser()
    config_module.add_arguments(parser)
    env = {"BOOKING_PORT": "6000", "BOOKING_HOLD_TTL_SECONDS": "60", "BOOKING_LOG_JSON": "yes"}
    config = from_sources(parser.parse_args(["--port", "7000"]), env)
    assert config.port == 7000
    assert config.hold_ttl_seconds == 60.0
    assert config.log_json is True
    assert config.check_user_overlap is True
    assert (
        from_sources(parser.parse_args(["--no-check-user-overlap"]), {}).check_user_overlap is False
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BOOKING_PORT": "http"}, "BOOKING_PORT"),
        ({"BOOKING_PORT": "70000"}, "port"),
        ({"BOOKING_HOLD_TTL_SECONDS": "0"}, "hold_ttl_seconds"),
        ({"BOOKING_POOL_MIN_SIZE": "5", "BOOKING_POOL_MAX_SIZE": "2"}, "pool"),
        ({"BOOKING_LOG_LEVEL": "chatty"}, "log_level"),
        ({"BOOKING_TLS_CERT": "/nonexistent.pem"}, "tls_cert and tls_key"),
        ({"BOOKING_CHECK_USER_OVERLAP": "maybe"}, "BOOKING_CHECK_USER_OVERLAP"),
    ],
)
def test_invalid_configuration_is_refused_at_start_up(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_sources(None, env)


def test_json_logs_carry_the_rpc_fields() -> None:
    record = logging.LogRecord("booking.rpc", logging.INFO, __file__, 1, "%s", ("x",), None)
    record.rpc_method = "/booking.v1.SlotService/GetSlot"
    record.rpc_code = "OK"
    record.duration_ms = 1.5
    line = json.loads(JsonFormatter().format(record))
    assert line["rpc_method"] == "/booking.v1.SlotService/GetSlot"
    assert line["rpc_code"] == "OK" and line["duration_ms"] == 1.5
    assert line["level"] == "INFO" and line["message"] == "x"


def test_the_cli_reports_configuration_errors_without_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import main

    monkeypatch.setenv("BOOKING_PORT", "-1")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "Traceback" not in err


async def test_tls_and_mutual_tls_serve_with_configured_certificates(
    database_url: str, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost")
    client_cert = ca.issue_cert("client.example")
    paths = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    server_cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server_cert.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server = BookingServer(
        ServerConfig.for_tests(
            database_url, tls_cert=paths["cert"], tls_key=paths["key"], tls_client_ca=paths["ca"]
        )
    )
    await server.start()
    try:
        target = f"localhost:{server.port}"
        with_client_cert = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem.bytes(),
            private_key=client_cert.private_key_pem.bytes(),
            certificate_chain=client_cert.cert_chain_pems[0].bytes(),
        )
        async with grpc.aio.secure_channel(target, with_client_cert) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == SERVING
        without = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        async with grpc.aio.secure_channel(target, without) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=1)


async def test_shutdown_ends_open_streams_with_unavailable_so_clients_resume(
    database_url: str,
) -> None:
    from booking.v1 import appointment_pb2 as apb
    from tests.support import Api, failure

    server = BookingServer(ServerConfig.for_tests(database_url, heartbeat_seconds=30))
    await server.start()
    async with Api.connect(server) as api:
        call = api.appointments.WatchAppointmentEvents(
            apb.WatchAppointmentEventsRequest(), metadata=api.md
        )
        opening = await call.read()
        assert isinstance(opening, apb.WatchAppointmentEventsResponse)
        assert opening.WhichOneof("kind") == "heartbeat"
        stopping = server.stop(grace=30)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        await stopping
    # Ended by the server's request (a reason), not cut off when grace ran out.
    got = failure(ended.value)
    assert got.code == grpc.StatusCode.UNAVAILABLE and got.reason == "SHUTTING_DOWN"


def test_serve_says_plainly_when_it_cannot_start(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    from service import cli, logs

    monkeypatch.setattr(logs, "configure", lambda level, as_json: None)
    monkeypatch.setenv("DATABASE_URL", database_url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert cli.main(["serve", "--port", port, "--no-migrate-on-start"]) == 1
    err = capsys.readouterr().err
    assert "cannot start" in err and "Traceback" not in err


@contextmanager
def socket_on_free_port() -> Iterator[int]:
    """A port that was free a moment ago and is closed again on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_no_tls_negotiation_with_a_loopback_database_unless_asked() -> None:
    from storage.database import tls_options

    assert tls_options("postgresql://u:p@127.0.0.1:5432/db") == {"ssl": False}
    assert tls_options("postgresql://u:p@localhost/db") == {"ssl": False}
    # An explicit sslmode, or a remote server, keeps asyncpg's own handling.
    assert tls_options("postgresql://u:p@127.0.0.1/db?sslmode=require") == {}
    assert tls_options("postgresql://u:p@db.internal:5432/db") == {}
