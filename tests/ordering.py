"""Slowest files first, so the suite's two workers finish together.

`scripts/test` runs pytest on two processes taking whole files
(``--dist loadfile``). A worker that takes a long file last ends minutes
after the other; xdist's own reordering (by number of tests) puts the
longest files, which hold few tests, at the end. tests/file-costs.txt
records each file's seconds (setup, call and teardown of its tests) from a
``--durations=0`` run; the collection is ordered by it, most expensive
first, keeping each file's tests in the order they had (pytest-randomly's
shuffle included). A file not listed costs nothing and goes last.

Refresh the table after a change that moves a file's cost by much:

    .venv/bin/python -m pytest -n 2 --dist loadfile --durations=0 -q > /tmp/durations.txt
    .venv/bin/python -m tests.ordering /tmp/durations.txt > tests/file-costs.txt
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pytest

COSTS = Path(__file__).with_name("file-costs.txt")
_DURATION = re.compile(r"^([0-9.]+)s\s+(?:setup|call|teardown)\s+([^:\s]+)::")


def file_costs(lines: Iterable[str]) -> dict[str, float]:
    """Seconds per test file from pytest's ``--durations=0`` lines."""
    costs: dict[str, float] = defaultdict(float)
    for line in lines:
        found = _DURATION.match(line.strip())
        if found:
            costs[found.group(2)] += float(found.group(1))
    return dict(costs)


def recorded() -> dict[str, float]:
    costs: dict[str, float] = {}
    if COSTS.exists():
        for line in COSTS.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                seconds, path = line.split()
                costs[path] = float(seconds)
    return costs


def slowest_files_first(items: list[pytest.Item]) -> None:
    """Reorder `items` in place: files by recorded cost, most first (a stable
    sort: the tests of one file keep their order, and so do files of equal
    cost)."""
    costs = recorded()
    items.sort(key=lambda item: -costs.get(item.nodeid.split("::", 1)[0], 0.0))


def main(argv: list[str]) -> int:
    with open(argv[1]) as durations:
        costs = file_costs(durations)
    print("# seconds per test file (tests/ordering.py); the most expensive run first")
    for path, seconds in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{seconds:.1f} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
