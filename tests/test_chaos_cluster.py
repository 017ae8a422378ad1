"""A short `booking-service chaos --cluster patroni` run: etcd, three
Patroni nodes, two replicas reading and streaming from the standbys,
readers with consistency tokens, watchers and pagers of the event log, and
a killed primary, a switchover and a killed synchronous standby under load.
No invariant may break, no answer may be UNKNOWN or INTERNAL, and every
replica must be seen reading the event log on a standby (its streams and
pages were served there, not only by the primary it falls back to).

No hangs: a hang lasts longer than Patroni's 20 s TTL, too long for the
suite (the long runs of docs/chaos.md have them). It runs in a
subprocess, as an operator would run it. Speed is not asserted.
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
FAULTS = ("primary_kill", "switchover", "sync_standby_kill")


def test_short_cluster_chaos_run_with_standby_readers_breaks_no_invariant(
    tmp_path: Path,
) -> None:
    out = tmp_path / "chaos-cluster.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chaos",
            "--cluster",
            "patroni",
            # The run lasts until each of FAULTS was injected once (each
            # waits for a healthy cluster first), however short the duration.
            "--duration",
            "20",
            "--fault-interval",
            "4",
            "--faults",
            ",".join(FAULTS),
            "--clients",
            "6",
            "--seed",
            "25",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = proc.stdout + proc.stderr
    assert out.exists(), report
    summary = json.loads(out.read_text())

    # The run did what it says: every fault kind, from the standbys.
    assert summary["meta"]["standby_reads"] is True, report
    assert {k: v["count"] >= 1 for k, v in summary["faults"].items()} == dict.fromkeys(
        FAULTS, True
    ), report
    for op in ("HoldSlot", "ConfirmAppointment", "CancelAppointment"):
        assert summary["operations"][op]["ok"] > 0, report
    assert summary["readers"]["tokened_checked"] > 0, report
    consumers = summary["consumers"]
    assert {name.split("-")[0] for name in consumers} == {"all", "probe", "list"}, report
    assert all(c["events"] > 0 for c in consumers.values()), report
    observed = summary["standby_reads_observed"]
    for replica in ("replica-0", "replica-1"):
        event_reads = sum(n for k, n in observed.get(replica, {}).items() if "event_log" in k)
        assert event_reads > 0, report
    assert set(summary["violations"]) == set(CHECKS)
    assert not {"UNKNOWN", "INTERNAL"} & set(summary["answers_by_code"]), report

    # And broke nothing.
    assert summary["total_violations"] == 0, report
    assert proc.returncode == 0, report
