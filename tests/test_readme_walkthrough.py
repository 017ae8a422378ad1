"""The README's grpcurl walk-through, run as written with the real grpcurl
against a real `booking-service serve` process, so the README cannot rot.
Also checks that SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- walkthrough:"
END_MARKER = "<!-- /walkthrough -->"


def walkthrough_script() -> str:
    """Every bash block between the markers, run in one shell in order: the
    later ones go on with the first one's variables."""
    text = (ROOT / "README.md").read_text()
    start = text.index(MARKER)
    between = text[start : text.index(END_MARKER, start)]
    blocks = re.findall(r"```bash\n(.*?)```", between, flags=re.S)
    assert len(blocks) >= 2, "the booking and the schedule walk-throughs in README.md"
    return "\n".join(blocks)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited early"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"server did not listen on {port}")


def test_readme_walkthrough_books_an_appointment_with_grpcurl(database_url: str) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BOOKING_PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_port(port, server)
        script = walkthrough_script().replace("localhost:50051", f"localhost:{port}")
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        assert "booking.v1.AppointmentService" in out  # grpcurl list, via reflection
        assert "refused, as it should be" in out
        assert "SLOT_UNAVAILABLE" in out
        assert '"status": "APPOINTMENT_STATUS_CONFIRMED"' in out
        assert "APPOINTMENT_EVENT_TYPE_HELD" in out
        assert "APPOINTMENT_EVENT_TYPE_CONFIRMED" in out
        # The waitlist: a search, an offer on the stream, the entry fulfilled.
        assert '"specialist_full_name": "Dr. Ada Lovelace"' in out
        assert '"waitlist_entry_id"' in out
        assert '"status": "WAITLIST_ENTRY_STATUS_FULFILLED"' in out
        # Working hours: a month in one call, 09:00 Berlin on both sides of
        # the clock change, a second run creating nothing, a client refused.
        assert "308 slots in Europe/Berlin" in out
        assert "2030-10-25T07:00:00Z\n2030-10-28T08:00:00Z" in out
        assert "SKIP_REASON_EXISTING_SLOT" in out
        assert "OUTSIDE_BOOKING_WINDOW" in out
        assert "outside the booking window, as it should be" in out
        assert "APPOINTMENT_STATUS_HOLD" in out
        # Seats, a buffer and a series: two seats held, five left, the
        # session after the class refused, four Tuesdays at 18:00 Berlin.
        assert "\n2\n5\n" in out
        assert "WITHIN_BUFFER" in out and "inside the buffer, as it should be" in out
        assert (
            "True ['2030-03-19T17:00:00Z', '2030-03-26T17:00:00Z',"
            " '2030-04-02T16:00:00Z', '2030-04-09T16:00:00Z']"
        ) in out
        assert result.stdout.rstrip().endswith("APPOINTMENT_STATUS_CONFIRMED")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
        stderr = server.stderr.read().decode() if server.stderr else ""
    assert code == 0, stderr
    assert "booking-service stopped" in stderr
    # One log line per RPC, with method, code and duration.
    assert re.search(r"/booking\.v1\.AppointmentService/HoldSlot OK \d+\.\dms", stderr)
    assert "FAILED_PRECONDITION" in stderr


def test_workers_share_one_port_and_all_stop_on_sigterm(database_url: str) -> None:
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "BOOKING_PORT": str(port)}
    parent = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_port(port, parent)
        deadline = time.monotonic() + 30
        listening = 0
        while time.monotonic() < deadline and listening < 2:
            time.sleep(0.2)
            listening = len(
                subprocess.run(
                    ["pgrep", "-f", "service.cli serve --workers 2 --worker-process"],
                    capture_output=True,
                    text=True,
                ).stdout.split()
            )
        assert listening == 2
    finally:
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(timeout=30)
        stderr = parent.stderr.read().decode() if parent.stderr else ""
    assert code == 0, stderr
    assert stderr.count("booking-service stopped") == 2
