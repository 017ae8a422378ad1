"""`booking-service bench --quick` runs every scenario end to end, in tiny
sizes, and what it checks about correctness holds.

Speed is never asserted: the figures of a run this short, on a shared
machine, mean nothing.
"""

from __future__ import annotations

import json
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
        "contention.c4",
        "events.streams1",
        "events.streams4",
        "events.idle20",
        "reads.list_slots.c2",
        "search.service_type_week.c1",
        "replicas.1",
        "replicas.2",
    ):
        assert key in figures, f"missing figure {key}"
        assert figures[key]["samples"], f"no samples for {key}"
    for fig in doc["figures"]:
        assert {"key", "label", "summary", "codes", "samples"} <= fig.keys()
    assert {g["name"] for g in doc["goals"]} >= {
        "service HoldSlot throughput vs direct-database ceiling",
        "contention rounds answered",
    }

    # Every hold on a distinct AVAILABLE slot succeeds.
    for key in ("service.hold.c1", "service.hold.c4", "replicas.2"):
        codes = figures[key]["codes"]
        assert codes.get("OK", 0) > 0 and set(codes) == {"OK"}, (key, codes)

    # Contention: exactly one winner per round, every loser told
    # FAILED_PRECONDITION, and the database agrees.
    contention = doc["checks"]["contention"]
    assert contention["expected_rounds"] == 5
    assert contention["rounds"] == contention["expected_rounds"]
    assert contention["one_winner_rounds"] == contention["expected_rounds"]
    assert contention["db_one_live_appointment"] == contention["expected_rounds"]
    sample = figures["contention.c4"]["samples"][0]
    assert sample["codes"] == {"OK": 5, "FAILED_PRECONDITION": 15}

    # Every search found free slots.
    codes = figures["search.service_type_week.c1"]["codes"]
    assert codes.get("OK", 0) > 0 and set(codes) == {"OK"}, codes

    # No ABORTED, INTERNAL or UNKNOWN answer anywhere.
    assert doc["checks"]["bad_answers"] == {}
    for fig in doc["figures"]:
        for code in BAD_CODES:
            assert fig["codes"].get(code, 0) == 0, (fig["key"], fig["codes"])
