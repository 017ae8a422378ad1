"""A short `booking-service chaos --cluster patroni` run: etcd, three
Patroni nodes in synchronous mode, two replicas on the multi-host URL, and
one each of the faults that move or stop the leader (a postmaster SIGKILL,
a planned switchover, the whole leader node hung past the TTL and resumed
as a demoted node). Any violation of any check fails it, the cluster
checks included: nothing acknowledged lost, no phantom or missing event,
no write on a node that was not the leader.

It runs in a subprocess, as an operator would run it (the suite SIGKILLs
and freezes processes, none of which belongs inside the test session).
Recovery times are printed, not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.checks import CHECKS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ("primary_kill", "switchover", "node_hang")


def test_short_cluster_chaos_run_breaks_no_invariant(tmp_path: Path) -> None:
    out = tmp_path / "chaos-cluster.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chaos",
            "--cluster",
            "patroni",
            "--duration",
            "45",
            "--faults",
            ",".join(FAULTS),
            "--fault-interval",
            "3",
            "--clients",
            "6",
            "--seed",
            "18",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = proc.stdout + proc.stderr
    print(proc.stdout)
    assert out.exists(), report
    summary = json.loads(out.read_text())

    # The run did what it says: each fault once, the leader moved.
    assert {k: v["count"] >= 1 for k, v in summary["faults"].items()} == dict.fromkeys(
        FAULTS, True
    ), report
    assert summary["meta"]["leader_changes"] >= 2, report
    assert summary["operations"]["HoldSlot"]["ok"] > 0, report
    assert all(c["events"] > 0 for c in summary["consumers"].values()), report
    assert set(summary["violations"]) == set(CHECKS)

    # And broke nothing.
    assert summary["total_violations"] == 0, report
    assert proc.returncode == 0, report
