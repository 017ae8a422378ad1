"""`booking-service bench --quick` of the scenarios that make their own
PostgreSQL set-ups (a synchronous standby, two streaming standbys) or run
another revision, end to end in tiny sizes; what they check about
correctness holds. A file of its own so the suite's workers can run it
beside tests/test_bench_smoke.py.

Speed is never asserted: the figures of a run this short, on a shared
machine, mean nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from service import cli

pytestmark = pytest.mark.integration


def test_quick_standby_run_measures_single_and_synchronous(tmp_path: Path) -> None:
    """The standby scenario needs the embedded PostgreSQL (it makes the
    standby with pg_basebackup), so it runs on its own server here, in a
    short scratch path (a Unix socket's path is at most 107 bytes)."""
    results = tmp_path / "results"
    data = Path(tempfile.mkdtemp(prefix="bst-"))
    try:
        _standby_run(results, data)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _standby_run(results: Path, data: Path) -> None:
    rc = cli.main(
        [
            "bench",
            "--",
            "--quick",
            "--scenarios",
            "standby",
            "--no-pgbench",
            "--results-dir",
            str(results),
            "--data-dir",
            str(data),
        ]
    )
    assert rc == 0
    doc = json.loads((results / "latest.json").read_text())
    figures = {f["key"]: f for f in doc["figures"]}
    for side in ("single", "sync"):
        for key in (f"standby.hold.{side}.c1", f"standby.hold.{side}.c4"):
            codes = figures[key]["codes"]
            assert codes.get("OK", 0) > 0 and set(codes) == {"OK"}, (key, codes)
        assert set(figures[f"standby.hold_confirm.{side}.c4"]["codes"]) == {"OK"}
    # The standby replayed the synchronous side's commits (its CPU is
    # counted), and was stopped for the single side (none is).
    assert figures["standby.hold.sync.c4"]["samples"][0]["standby_cpu_us"] > 0
    assert "standby_cpu_us" not in figures["standby.hold.single.c4"]["samples"][0]
    goals = {g["name"]: g for g in doc["goals"]}
    for name in (
        "synchronous standby: HoldSlot c1 vs single PostgreSQL",
        "synchronous standby: HoldSlot c4 vs single PostgreSQL",
        "synchronous standby: Hold+Confirm c4 vs single PostgreSQL",
    ):
        assert goals[name]["value"] != "not measured", name
    # Everything the run started is gone with its scratch directory.
    assert not list(data.glob("run-*"))


def test_quick_events_run_alternates_with_another_revision(
    pg_admin_url: str, tmp_path: Path
) -> None:
    """--previous-release: the events scenario measures that revision's
    server too, on the same database, and the goals compare the p99s."""
    results = tmp_path / "results"
    rc = cli.main(
        [
            "bench",
            "--",
            "--quick",
            "--scenarios",
            "events",
            "--idle-streams",
            "0",
            "--previous-release",
            "HEAD",
            "--database-url",
            pg_admin_url,
            "--results-dir",
            str(results),
            "--data-dir",
            str(tmp_path / "data"),
        ]
    )
    assert rc == 0
    doc = json.loads((results / "latest.json").read_text())
    figures = {f["key"]: f for f in doc["figures"]}
    for key in ("events.streams4", "events.previous.streams4"):
        sample = figures[key]["samples"][0]
        assert sample["events_received"] > 0, key
        assert set(figures[key]["codes"]) == {"OK"}, (key, figures[key]["codes"])
    goals = {g["name"]: g for g in doc["goals"]}
    compared = goals["event delivery p99, this release vs the previous one (alternating, same run)"]
    assert "events.previous.streams4" in compared["value"]


def test_quick_standby_reads_run_measures_every_phase(tmp_path: Path) -> None:
    """The standby-reads scenario makes its own primary and two standbys,
    serves reads from them with and without tokens, and reports the
    routing: every phase answered OK, the standby phases' reads served by
    standbys, the tokened phase's waits measured."""
    results = tmp_path / "results"
    data = Path(tempfile.mkdtemp(prefix="bsr-"))
    try:
        rc = cli.main(
            [
                "bench",
                "--",
                "--quick",
                "--scenarios",
                "standby-reads",
                "--no-pgbench",
                "--results-dir",
                str(results),
                "--data-dir",
                str(data),
            ]
        )
        assert rc == 0
        assert not list(data.glob("run-*"))
    finally:
        shutil.rmtree(data, ignore_errors=True)
    doc = json.loads((results / "latest.json").read_text())
    figures = {f["key"]: f for f in doc["figures"]}
    samples = {
        phase: figures[f"standby_reads.{phase}.c2"]["samples"][0]
        for phase in ("writes", "primary", "token_writes", "standbys", "tokens")
    }
    for phase, sample in samples.items():
        assert set(sample["codes"]) == {"OK"}, (phase, sample["codes"])
    for phase in ("writes", "token_writes"):
        assert samples[phase]["writes"] > 0 and samples[phase]["reads"] == 0, phase
    assert "token_cost_us" in samples["token_writes"]
    assert samples["primary"]["standby_reads"] == 0
    for phase in ("standbys", "tokens"):
        # A standby may be skipped for a moment (lag, a slow check): most
        # reads, not necessarily all, go to the standbys.
        assert samples[phase]["standby_reads"] > 0, phase
        assert samples[phase]["standby_pg_cpu_us"] > 0, phase
    assert samples["tokens"]["token_waits"] > 0
    assert "token_waits" not in samples["standbys"]
    goals = {g["name"]: g for g in doc["goals"] if g["name"].startswith("standby reads")}
    assert len(goals) == 5
    assert all(g["value"] != "not measured" for g in goals.values()), goals
