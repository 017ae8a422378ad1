"""The summary of a run: operations by kind, faults by kind with recovery
times, answers by code, consumers, and violations by check."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from typing import Any

from chaos.checks import CHECKS, Violation
from chaos.faults import FaultRecord
from chaos.history import History

SHOWN_PER_CHECK = 5


def _seconds(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def summarize(
    history: History,
    faults: list[FaultRecord],
    violations: list[Violation],
    meta: dict[str, Any],
) -> dict[str, Any]:
    ops: dict[str, Counter[str]] = defaultdict(Counter)
    for r in history.requests:
        c = ops[r.op]
        c["requests"] += 1
        c["copies"] += len(r.copies)
        c["attempts"] += sum(len(cp.attempts) for cp in r.copies)
        if r.acknowledged is not None:
            c["ok"] += 1
        elif r.answers:
            c["refused"] += 1
        else:
            c["gave_up"] += 1
    by_kind: dict[str, list[FaultRecord]] = defaultdict(list)
    for f in faults:
        by_kind[f.kind].append(f)
    fault_rows = {
        kind: {
            "count": len(recs),
            "failed_to_inject": sum(1 for f in recs if f.error),
            "to_serving_s": _seconds([f.to_serving for f in recs if f.to_serving is not None]),
            "to_first_hold_s": _seconds(
                [f.to_first_hold for f in recs if f.to_first_hold is not None]
            ),
            "health_noticed": sum(1 for f in recs if f.health_noticed),
            "not_recovered": sum(
                1 for f in recs if f.to_serving is None or f.to_first_hold is None
            ),
        }
        for kind, recs in sorted(by_kind.items())
    }
    reasons: Counter[str] = Counter()
    for r in history.requests:
        for a in r.answers:
            if a.code != "OK":
                reasons[f"{a.code} {a.reason}".strip()] += 1
    grouped: dict[str, list[str]] = {check: [] for check in CHECKS}
    for v in violations:
        grouped.setdefault(v.check, []).append(v.detail)
    return {
        "meta": meta,
        "operations": {op: dict(c) for op, c in sorted(ops.items())},
        "total_operations": len(history.requests),
        "faults": fault_rows,
        "total_faults": len(faults),
        "fault_log": [f.to_json() for f in faults],
        "answers_by_code": dict(history.attempt_codes().most_common()),
        "refusals_by_reason": dict(reasons.most_common()),
        "consumers": {
            log.name: {
                "events": len(log.event_ids),
                "connects": log.connects,
                "stalls": log.stalls,
                "errors": dict(log.errors),
            }
            for log in history.consumers
        },
        "violations": {check: len(details) for check, details in grouped.items()},
        "violation_details": {k: v for k, v in grouped.items() if v},
        "total_violations": len(violations),
    }


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def render(summary: dict[str, Any]) -> str:
    parts = []
    meta = summary["meta"]
    parts.append(
        f"chaos run: {summary['total_operations']:,} operations, {summary['total_faults']} faults,"
        f" {meta.get('replicas')} replicas, {meta.get('clients')} clients, seed {meta.get('seed')},"
        f" {meta.get('wall_seconds', 0):.0f}s"
    )
    parts.append(
        "\nOperations\n"
        + _table(
            ["operation", "requests", "copies", "attempts", "ok", "refused", "gave up"],
            [
                [
                    op,
                    c.get("requests", 0),
                    c.get("copies", 0),
                    c.get("attempts", 0),
                    c.get("ok", 0),
                    c.get("refused", 0),
                    c.get("gave_up", 0),
                ]
                for op, c in summary["operations"].items()
            ],
        )
    )
    parts.append(
        "\nFaults (median / max seconds; to SERVING from the end of the fault, to first"
        " hold from its end, or from its start for the cluster kinds)\n"
        + _table(
            [
                "fault",
                "count",
                "failed",
                "health noticed",
                "to SERVING",
                "to first hold",
                "not recovered",
            ],
            [
                [
                    kind,
                    f["count"],
                    f["failed_to_inject"],
                    f["health_noticed"],
                    f"{f['to_serving_s']['median']} / {f['to_serving_s']['max']}",
                    f"{f['to_first_hold_s']['median']} / {f['to_first_hold_s']['max']}",
                    f["not_recovered"],
                ]
                for kind, f in summary["faults"].items()
            ],
        )
    )
    parts.append(
        "\nAnswers by code (every attempt)\n"
        + _table(["code", "count"], [[k, v] for k, v in summary["answers_by_code"].items()])
    )
    parts.append(
        "\nConsumers\n"
        + _table(
            ["consumer", "events", "connects", "stalls", "errors"],
            [
                [
                    name,
                    c["events"],
                    c["connects"],
                    c["stalls"],
                    ", ".join(f"{k} x{v}" for k, v in sorted(c["errors"].items())) or "-",
                ]
                for name, c in summary["consumers"].items()
            ],
        )
    )
    readers = summary.get("readers")
    if readers and (readers["tokened_checked"] or readers["tokened_unchecked"]):
        parts.append(
            "\nReaders (a write, then a read of it through another replica)\n"
            + _table(
                ["reads", "count"],
                [
                    ["tokened, checked against the final history", readers["tokened_checked"]],
                    [
                        "tokened, not checkable (no token, lost write, gave up)",
                        readers["tokened_unchecked"],
                    ],
                    ["untokened, checked", readers["untokened_checked"]],
                    ["untokened, older than the write (allowed)", readers["untokened_stale"]],
                    ["gave up", readers["gave_up"]],
                    *[[f"by method: {k}", v] for k, v in sorted(readers["by_method"].items())],
                ],
            )
        )
    observed = summary.get("standby_reads_observed")
    if observed is not None:
        parts.append(
            "\nReads seen on standbys (sampled statements per replica and node)\n"
            + _table(
                ["replica", "statements"],
                [
                    [replica, ", ".join(f"{k}: {v}" for k, v in kinds.items()) or "none"]
                    for replica, kinds in sorted(observed.items())
                ]
                or [["-", "none"]],
            )
        )
    parts.append(
        "\nViolations\n"
        + _table(["check", "violations"], [[k, v] for k, v in summary["violations"].items()])
    )
    for check, details in summary["violation_details"].items():
        parts.append(f"\n{check}:")
        for d in details[:SHOWN_PER_CHECK]:
            parts.append(f"  - {d}")
        if len(details) > SHOWN_PER_CHECK:
            parts.append(f"  ... and {len(details) - SHOWN_PER_CHECK} more")
    verdict = (
        "PASSED"
        if summary["total_violations"] == 0
        else (f"FAILED: {summary['total_violations']} violations")
    )
    parts.append(f"\n{verdict}")
    return "\n".join(parts)
