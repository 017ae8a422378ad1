"""The harness's own checks, on made-up inputs (no servers)."""

from __future__ import annotations

from bench.profile import summarize_stacks
from bench.scenarios import count_untrue_refusals


def test_a_refusal_counts_as_untrue_before_the_winning_commit_or_without_one() -> None:
    refused_at = {
        0: [10.0, 10.5, 11.0],  # winner committed at 10.2: one refusal came first
        1: [20.0, 20.1],  # nobody won: both refusals were untrue
        2: [30.5, 31.0],  # all after the commit at 30.1
    }
    committed: dict[int, float | None] = {0: 10.2, 1: None, 2: 30.1}
    assert count_untrue_refusals(refused_at, committed) == 3
    assert count_untrue_refusals({2: [30.5, 31.0]}, committed) == 0


def test_stack_summary_counts_own_and_inclusive_samples() -> None:
    raw = "\n".join(
        [
            "process 1:main;a (x.py);b (y.py) 3",
            "process 1:main;a (x.py) 1",
            "process 1:main;c (z.py);b (y.py) 2",
            "garbage",
        ]
    )
    total, own, inclusive = summarize_stacks(raw)
    assert total == 6
    assert own[0] == ("b (y.py)", 5)
    assert dict(inclusive)["a (x.py)"] == 4
    assert dict(inclusive)["b (y.py)"] == 5


def test_the_floor_rpc_exists_only_in_the_bench_server() -> None:
    # Importing the bench's server changes nothing: only its main() adds
    # the floor RPC's policy and servicer, in the bench's own process.
    from bench import floor_server
    from service import cli
    from service.policy import POLICIES
    from service.server import BookingServer

    assert floor_server.METHOD not in POLICIES
    assert getattr(cli, "BookingServer") is BookingServer  # noqa: B009


def test_standby_read_figures_become_a_goal_and_none_means_no_goal() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from bench.harness import _capability_goals
    from bench.report import Figure

    def fig(key: str, server: float, pg: float) -> Figure:
        return Figure(
            key, "x", key, samples=[{"throughput": 1.0, "server_cpu_us": server, "pg_cpu_us": pg}]
        )

    none: Any = SimpleNamespace(figures={})
    assert not [g for g in _capability_goals(cast(Any, none)) if "standby" in g.name]
    figures = {
        f.key: f
        for f in (
            fig("standby_reads.list_slots.primary.c16", 800, 200),
            fig("standby_reads.list_slots.standby.c16", 900, 300),
        )
    }
    goals = [g for g in _capability_goals(cast(Any, SimpleNamespace(figures=figures)))]
    standby = [g for g in goals if g.name.startswith("standby reads: list_slots")]
    assert len(standby) == 1 and standby[0].met is False
    assert "1,200 us" in standby[0].value and "1.20x" in standby[0].value


def test_standby_reads_figures_become_goals_with_ratios_and_verdicts() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from bench import standby_reads
    from bench.report import Figure

    none: Any = SimpleNamespace(figures={})
    assert standby_reads.goals(cast(Any, none)) == []

    def fig(key: str, **sample: float) -> Figure:
        return Figure(f"standby_reads.{key}.c16", "standby-reads", key, samples=[sample])

    figures = {
        f.key: f
        for f in (
            fig("writes", throughput=100.0, pg_cpu_us=900.0),
            fig("primary", pg_cpu_us=200.0, p50_ms=2.0, p99_ms=10.0, reads=1000.0),
            # 90% off the primary; p99 2.5x the primary's: missed.
            fig(
                "standbys",
                pg_cpu_us=20.0,
                p50_ms=2.5,
                p99_ms=25.0,
                standby_share_pct=100.0,
                fallbacks=0.0,
                reads=1000.0,
            ),
            # 70% off: missed; token waits within bounds but 2% fell back.
            fig(
                "tokens",
                pg_cpu_us=60.0,
                p50_ms=2.5,
                p99_ms=30.0,
                standby_share_pct=98.0,
                fallbacks=20.0,
                reads=1000.0,
                token_wait_p50_ms=0.3,
                token_wait_p90_ms=0.6,
                token_wait_p99_ms=4.0,
                token_wait_max_ms=40.0,
            ),
        )
    }
    goals = {g.name: g for g in standby_reads.goals(cast(Any, SimpleNamespace(figures=figures)))}
    off_tokens = goals[
        "standby reads with tokens: read work off the primary (its PostgreSQL CPU per read)"
    ]
    off_plain = goals[
        "standby reads without tokens: read work off the primary (its PostgreSQL CPU per read)"
    ]
    assert (off_tokens.met, off_plain.met) == (False, True)
    assert "70% off" in off_tokens.value and "90% off" in off_plain.value
    latency = goals["standby reads: read latency without tokens vs on the primary"]
    assert latency.met is False and "p99 25.00 vs 10.00 ms = 2.50x" in latency.value
    tokened = goals["standby reads: read latency with tokens vs without"]
    assert tokened.met is True and "= 1.20x" in tokened.value
    waits = goals["standby reads: token waits (read-your-writes on a standby)"]
    assert waits.met is False and "p99 4.00" in waits.value and "= 2.00%" in waits.value
    # Every goal of the scenario is measured from these figures.
    assert all(g.met is not None for g in goals.values())
