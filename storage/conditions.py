"""Building WHERE clauses from optional filters.

A predicate like ``($1::uuid IS NULL OR specialist_id = $1)`` defeats
indexes once PostgreSQL switches a prepared statement to its generic plan,
so list queries include only the predicates of the filters actually given.
That makes a handful of distinct statements, each with an index-friendly
plan."""

from __future__ import annotations

from typing import Any


class Conditions:
    def __init__(self) -> None:
        self.args: list[Any] = []
        self._conditions: list[str] = []

    def arg(self, value: Any) -> str:
        """A placeholder for `value`."""
        self.args.append(value)
        return f"${len(self.args)}"

    def add(self, template: str, *values: Any) -> None:
        """Add a condition; each ``{}`` in `template` becomes a placeholder."""
        self._conditions.append(template.format(*(self.arg(v) for v in values)))

    def add_if(self, value: Any, template: str) -> None:
        if value is not None:
            self.add(template, value)

    def sql(self, prefix: str = " AND ") -> str:
        """The conditions joined by AND, after `prefix`; empty if none."""
        return prefix + " AND ".join(self._conditions) if self._conditions else ""
