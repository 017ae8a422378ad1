"""`booking-service bench --quick` runs every scenario end to end, in tiny
sizes, and what it checks about correctness holds.

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

BAD_CODES = ("ABORTED", "INTERNAL", "UNKNOWN")


def test_quick_bench_run_is_correct_and_writes_results(pg_admin_url: str, tmp_path: Path) -> None:
    results = tmp_path / "results"
    # "--" because the CLI's bench subcommand passes through what follows it.
    rc = cli.main(
        [
            "bench",
            "--",
            "--quick",
            "--database-url",
            pg_admin_url,
            "--results-dir",
            str(results),
            "--data-dir",
            str(tmp_path / "data"),
            "--history-rows",
            "2000",
        ]
    )
    assert rc == 0

    doc = json.loads((results / "latest.json").read_text())
    assert {"meta", "goals", "checks", "notes", "figures", "table"} <= doc.keys()
    assert (results / "latest.md").read_text().startswith("# booking-service benchmark results")
    assert list(results.glob("bench-*.json")) and list(results.glob("bench-*.md"))

    figures = {f["key"]: f for f in doc["figures"]}
    for key in (
        "ceiling.asyncpg.function.c4",
        "ceiling.asyncpg.seed.c4",
        "service.hold.c1",
        "service.hold.c4",
        "service.hold_confirm.c4",
        "echo.bare.c4",
        "echo.service_health.c4",
        "floor.round_trip.c4",
        "seats.single.c4",
        "seats.multi.c4",
        "series.hold10.c2",
        "webhooks.hold.none.c4",
        "webhooks.hold.subscribed.c4",
        "contention.c4",
        "events.streams1",
        "events.streams4",
        "events.idle20",
        "reads.list_slots.c2",
        "search.service_type_week.c1",
        "replicas.1",
        "replicas.2",
        "service.hold_confirm.c1",
        *(
            f"history.{op}.{side}.c2"
            for op in (
                "hold",
                "get_slot",
                "list_slots",
                "list_appointments",
                "events_resume",
                "events_user",
            )
            for side in ("empty", "history")
        ),
    ):
        assert key in figures, f"missing figure {key}"
        assert figures[key]["samples"], f"no samples for {key}"
    for fig in doc["figures"]:
        assert {"key", "label", "summary", "codes", "samples"} <= fig.keys()
    goals = {g["name"]: g for g in doc["goals"]}
    assert set(goals) >= {
        "service HoldSlot throughput vs direct-database ceiling",
        "server CPU per HoldSlot vs echo floor",
        "PostgreSQL CPU per hold, service vs the design's bare hold transaction",
        "contention: 64 clients on one slot, all answered",
        "ListSlots (one specialist's day) server CPU per call vs echo floor",
        "server CPU per HoldSlot vs database floor (one round trip)",
        "ListSlots (one specialist's day) server CPU per call vs database floor",
        "seats: HoldSlot of one seat of a 5-seat slot vs of a single-seat slot"
        " (server + PostgreSQL CPU)",
        "series: HoldSeries of 10 vs 10 single-seat HoldSlots (server + PostgreSQL CPU)",
        "webhooks: HoldSlot with one endpoint subscribed vs none"
        " (server + PostgreSQL CPU, the dispatcher's included)",
        "event delivery with 100 streams",
        "flat with history: hold cost (server + PostgreSQL CPU per call)",
        "flat with history: events_user cost (server + PostgreSQL CPU per call)",
    }
    # Every goal is computed from this run's figures (pgbench may be
    # missing; the asyncpg ceiling then stands in), none left unmeasured.
    unmeasured = [name for name, g in goals.items() if g["value"] == "not measured"]
    assert unmeasured == [], unmeasured
    assert {"CPU per hold, 1 client(s) (service.hold.c1)"} <= set(doc["checks"]["scaling"])

    # The history scenario's reads answered with data on both sides.
    for fig in doc["figures"]:
        if fig["key"].startswith("history."):
            assert set(fig["codes"]) == {"OK"}, (fig["key"], fig["codes"])
    assert doc["checks"]["history"]["rows"] == 2000

    # Every hold on a distinct AVAILABLE slot succeeds.
    for key in (
        "service.hold.c1",
        "service.hold.c4",
        "replicas.2",
        "floor.round_trip.c4",
        "seats.multi.c4",
        "webhooks.hold.subscribed.c4",
    ):
        codes = figures[key]["codes"]
        assert codes.get("OK", 0) > 0 and set(codes) == {"OK"}, (key, codes)

    # Without an endpoint nothing is posted. (How many reach the subscribed
    # endpoint within the quick run's half second of holds depends on the
    # machine's load: the full run reports it; zero is possible here.)
    assert figures["webhooks.hold.none.c4"]["samples"][0]["webhook_posts"] == 0

    # Contention: exactly one winner per round, every loser told
    # FAILED_PRECONDITION, and the database agrees.
    contention = doc["checks"]["contention"]
    assert contention["expected_rounds"] == 5
    assert contention["rounds"] == contention["expected_rounds"]
    assert contention["one_winner_rounds"] == contention["expected_rounds"]
    assert contention["db_one_live_appointment"] == contention["expected_rounds"]
    sample = figures["contention.c4"]["samples"][0]
    assert sample["codes"] == {"OK": 5, "FAILED_PRECONDITION": 15}
    # The test database keeps no commit timestamps: the check says so
    # rather than claiming zero.
    assert contention.get("untrue_refusals") in (None, 0)

    # Every search found free slots.
    codes = figures["search.service_type_week.c1"]["codes"]
    assert codes.get("OK", 0) > 0 and set(codes) == {"OK"}, codes

    # No ABORTED, INTERNAL or UNKNOWN answer anywhere.
    assert doc["checks"]["bad_answers"] == {}
    for fig in doc["figures"]:
        for code in BAD_CODES:
            assert fig["codes"].get(code, 0) == 0, (fig["key"], fig["codes"])


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
