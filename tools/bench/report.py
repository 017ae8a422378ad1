"""Figures, goals, and the table / JSON / markdown made from them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import Spread, spread

# Answers that must never happen: the service maps every expected failure
# to a precise code, and retries conflicts itself.
BAD_CODES = ("ABORTED", "INTERNAL", "UNKNOWN")


@dataclass
class Figure:
    key: str
    scenario: str
    label: str
    throughput_unit: str = "calls/s"
    samples: list[dict[str, Any]] = field(default_factory=list)
    # (metric, label, unit) shown in the "other" column.
    extras: list[tuple[str, str, str]] = field(default_factory=list)
    note: str = ""

    def spread(self, metric: str) -> Spread | None:
        return spread(s.get(metric) for s in self.samples)

    def codes(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for sample in self.samples:
            for code, n in (sample.get("codes") or {}).items():
                total[code] = total.get(code, 0) + int(n)
        return total

    def bad_answers(self) -> dict[str, int]:
        return {c: n for c, n in self.codes().items() if c in BAD_CODES and n}

    def as_json(self) -> dict[str, Any]:
        metrics = sorted(
            {k for s in self.samples for k, v in s.items() if isinstance(v, int | float)}
        )
        summary = {}
        for m in metrics:
            sp = self.spread(m)
            if sp is not None:
                summary[m] = sp.as_dict()
        return {
            "key": self.key,
            "scenario": self.scenario,
            "label": self.label,
            "throughput_unit": self.throughput_unit,
            "note": self.note,
            "summary": summary,
            "codes": self.codes(),
            "samples": self.samples,
        }


@dataclass
class Goal:
    name: str
    target: str
    value: str
    met: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        return {True: "MET", False: "MISSED", None: "n/a"}[self.met]


def fmt_number(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if value == int(value):
        return f"{int(value):,}"
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_spread(sp: Spread | None) -> str:
    if sp is None:
        return "-"
    text = fmt_number(sp.mean)
    if sp.n > 1:
        low, high = fmt_number(sp.low), fmt_number(sp.high)
        if low != high:
            text += f" [{low}-{high}]"
    return text


COLUMNS = [
    ("throughput", "throughput/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("server_cpu_us", "server CPU us/call"),
    ("pg_cpu_us", "PG CPU us/call"),
]


def _other(fig: Figure) -> str:
    parts = []
    for metric, label, unit in fig.extras:
        sp = fig.spread(metric)
        if sp is not None:
            parts.append(f"{label} {fmt_spread(sp)}{unit}")
    unexpected = {c: n for c, n in fig.codes().items() if c != "OK" and n}
    if unexpected:
        parts.append("answers: " + ", ".join(f"{c} x{n}" for c, n in sorted(unexpected.items())))
    if fig.note:
        parts.append(fig.note)
    return "; ".join(parts)


def rows(figures: list[Figure]) -> list[list[str]]:
    out = []
    for fig in figures:
        row = [fig.key, fig.label]
        for metric, _ in COLUMNS:
            cell = fmt_spread(fig.spread(metric))
            if metric == "throughput" and cell != "-" and fig.throughput_unit != "calls/s":
                cell += f" {fig.throughput_unit.removesuffix('/s')}"
            row.append(cell)
        row.append(_other(fig))
        out.append(row)
    return out


HEADERS = ["figure", "what", *(h for _, h in COLUMNS), "other"]


def text_table(figures: list[Figure]) -> str:
    body = rows(figures)
    widths = [len(h) for h in HEADERS]
    for row in body:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))
    lines = []

    def line(cells: list[str]) -> str:
        padded = [c.ljust(widths[i]) for i, c in enumerate(cells[:-1])]
        return "  ".join([*padded, cells[-1]]).rstrip()

    lines.append(line(HEADERS))
    lines.append(line(["-" * w for w in widths[:-1]] + ["-----"]))
    for row in body:
        lines.append(line(row))
    return "\n".join(lines)


def goals_text(goals: list[Goal]) -> str:
    width = max((len(g.name) for g in goals), default=0)
    return "\n".join(
        f"  [{g.verdict:>6}] {g.name.ljust(width)}  target {g.target}; measured {g.value}"
        for g in goals
    )


def scaling_text(rows: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {name}: {value}" for name, value in rows)


def markdown(
    figures: list[Figure],
    goals: list[Goal],
    meta: dict[str, Any],
    notes: list[str],
    scaling: list[tuple[str, str]] | None = None,
    appendix: list[str] | None = None,
) -> str:
    out = [
        "# booking-service benchmark results",
        "",
        f"Run at {meta['started']} on {meta['cpus']} CPUs ({meta['platform']}), "
        f"{meta['repeats']} run(s) per figure of {meta['duration_seconds']} s each. "
        "Cells are the mean over runs, with [min-max] when runs differ.",
        "",
        "## Goals",
        "",
        "| goal | target | measured | verdict |",
        "| --- | --- | --- | --- |",
    ]
    for g in goals:
        out.append(f"| {g.name} | {g.target} | {g.value} | {g.verdict} |")
    if scaling:
        out += ["", "## Scaling model", "", "| figure | measured |", "| --- | --- |"]
        out += [f"| {name} | {value} |" for name, value in scaling]
    out += ["", "## Figures", ""]
    out.append("| " + " | ".join(HEADERS) + " |")
    out.append("|" + " --- |" * len(HEADERS))
    for row in rows(figures):
        out.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    out += ["", "## Settings", ""]
    for key, value in meta["settings"].items():
        out.append(f"- {key}: {value}")
    if notes:
        out += ["", "## Notes", ""]
        out += [f"- {n}" for n in notes]
    for section in appendix or []:
        out += ["", section]
    return "\n".join(out) + "\n"


def write(
    results_dir: Path,
    figures: list[Figure],
    goals: list[Goal],
    meta: dict[str, Any],
    notes: list[str],
    checks: dict[str, Any],
    scaling: list[tuple[str, str]] | None = None,
    appendix: list[str] | None = None,
) -> tuple[Path, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(meta["started_epoch"]))
    document = {
        "meta": meta,
        "goals": [g.__dict__ | {"verdict": g.verdict} for g in goals],
        "checks": checks,
        "notes": notes,
        "figures": [f.as_json() for f in figures],
        "table": text_table(figures),
    }
    json_path = results_dir / f"bench-{stamp}.json"
    md_path = results_dir / f"bench-{stamp}.md"
    json_text = json.dumps(document, indent=2, default=str) + "\n"
    md_text = markdown(figures, goals, meta, notes, scaling, appendix)
    json_path.write_text(json_text)
    md_path.write_text(md_text)
    (results_dir / "latest.json").write_text(json_text)
    (results_dir / "latest.md").write_text(md_text)
    return json_path, md_path
