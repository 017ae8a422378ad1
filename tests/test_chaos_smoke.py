"""A short `booking-service chaos` run: its own durable PostgreSQL, two
replicas, every fault kind at least once, and no invariant broken.

It runs in a subprocess, as an operator would run it: the suite starts and
SIGKILLs processes and freezes PostgreSQL, none of which belongs inside the
test session. Speed is not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.checks import CHECKS
from chaos.faults import KINDS
from chaos.history import READS, SERIES, TRANSITIONS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_short_chaos_run_breaks_no_invariant(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chaos",
            # The run lasts until every fault kind was injected once
            # (--faults-min defaults to the number of kinds), however short
            # the duration: 15 s of load around them, a fault every 1-3 s.
            "--duration",
            "15",
            "--fault-interval",
            "2",
            "--clients",
            "8",
            "--seed",
            "8",
            "--out",
            str(out),
            # No --work-dir: PostgreSQL runs as an unprivileged user when we
            # are root, and pytest's base temporary directory is private.
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = proc.stdout + proc.stderr
    assert out.exists(), report
    summary = json.loads(out.read_text())

    # The run did what it says: every operation and every fault kind.
    assert set(summary["operations"]) == set(TRANSITIONS) | set(READS) | set(SERIES), report
    for op in ("HoldSlot", "ConfirmAppointment", "CancelAppointment", "HoldSeries"):
        assert summary["operations"][op]["ok"] > 0, report
    assert {k: v["count"] >= 1 for k, v in summary["faults"].items()} == dict.fromkeys(
        KINDS, True
    ), report
    assert all(c["events"] > 0 for c in summary["consumers"].values()), report
    assert set(summary["violations"]) == set(CHECKS)

    # And broke nothing.
    assert summary["total_violations"] == 0, report
    assert proc.returncode == 0, report
