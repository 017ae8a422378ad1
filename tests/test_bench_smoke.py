"""`booking-service bench --quick` runs every scenario end to end, in tiny
sizes, and what it checks about correctness holds.

Speed is never asserted: the figures of a run this short, on a shared
machine, mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.scenarios import SCENARIOS
from service import cli

pytestmark = pytest.mark.integration

BAD_CODES = ("ABORTED", "INTERNAL", "UNKNOWN")


# Every scenario but standby-reads: tests/test_bench_smoke_setups.py runs
# that one on its own (a primary and two standbys of its own, whatever the
# database URL) and checks every figure and goal of it; it ran here too,
# for no assertion. (The standby scenario skips itself here: it needs the
# embedded server; the same file runs it.)
SCENARIOS_HERE = [name for name in SCENARIOS if name != "standby-reads"]


def test_quick_bench_run_is_correct_and_writes_results(pg_admin_url: str, tmp_path: Path) -> None:
    results = tmp_path / "results"
    # "--" because the CLI's bench subcommand passes through what follows it.
    rc = cli.main(
        [
            "bench",
            "--",
            "--quick",
            "--scenarios",
            ",".join(SCENARIOS_HERE),
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
