"""A small in-process rate limit per key (a client's address)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque


class PerKeyRate:
    """At most `limit` events per key in any `window` seconds (sliding).

    Kept in memory, per server: it bounds what one address can do through
    one replica, not across all of them. The number of keys is bounded too
    (the least recently used go first), so spraying addresses costs memory
    only up to MAX_KEYS.
    """

    MAX_KEYS = 10_000

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Count one event for `key`: 0 if allowed, else seconds to wait."""
        now = time.monotonic()
        events = self._events.pop(key, None) or deque()
        while events and events[0] <= now - self.window:
            events.popleft()
        self._events[key] = events
        if len(self._events) > self.MAX_KEYS:
            self._events.popitem(last=False)
        if len(events) >= self.limit:
            return max(0.001, events[0] + self.window - now)
        events.append(now)
        return 0.0


def peer_host(peer: str) -> str:
    """The address part of a grpc peer string ('ipv4:1.2.3.4:5678')."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0]
    return peer


def retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))
