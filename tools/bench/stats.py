"""Small statistics: percentiles of one run, spread across repeated runs."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None if empty.
    `values` must be sorted."""
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    rank = (len(values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return float(values[low] + (values[high] - values[low]) * (rank - low))


def latency_ms(values: Iterable[float]) -> dict[str, float | None]:
    """p50, p99 and max of latencies given in seconds, in milliseconds."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for name, q in (("p50_ms", 50.0), ("p99_ms", 99.0), ("max_ms", 100.0)):
        value = percentile(ordered, q)
        out[name] = None if value is None else value * 1000
    return out


@dataclass(frozen=True)
class Spread:
    """One figure over repeated runs."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def relative(self) -> float:
        """Half the range as a fraction of the mean."""
        return (self.high - self.low) / 2 / self.mean if self.mean else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "min": self.low, "max": self.high, "runs": self.n}


def spread(values: Iterable[float | int | None]) -> Spread | None:
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    return Spread(sum(present) / len(present), min(present), max(present), len(present))
